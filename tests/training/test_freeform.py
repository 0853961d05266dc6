"""The freeform evaluation: its gallery, queries and truth, its calibration error on hand-made
predictions, the temperature fit, and small runs end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imsearch.cli import app
from reranker.model import Matcher, RerankerConfig, load_reranker
from training.descriptions import KINDS, holds
from training.freeform import (
    auto_shares,
    best_calibration,
    calibration_error,
    freeform_gallery,
    freeform_queries,
    raw_margins,
    truth,
)


def test_gallery_queries_and_truth() -> None:
    samples = freeform_gallery(40, seed=7)
    assert len(samples) == 40 and all(samples[i].index == samples[i + 1].index for i in range(0, 40, 2))
    queries = freeform_queries(samples, per_kind=4, seed=7)
    assert [q.kind for q in queries] == [kind for kind in KINDS for _ in range(4)]
    assert [q.text for q in queries] == [q.text for q in freeform_queries(samples, 4, 7)]  # deterministic
    true = truth(queries, samples)
    assert true.shape == (len(queries), 40) and true.any(axis=1).all()  # each is true of its own scene at least
    row = 3
    assert list(true[row]) == [holds(queries[row].claim, s.scene) for s in samples]


def _logged(pairs: list[tuple[float, bool]]) -> list[tuple[float, bool]]:
    return [(float(np.log(p)), t) for p, t in pairs]


def test_calibration_error_of_hand_made_predictions() -> None:
    assert calibration_error(_logged([(0.9, True)] * 9 + [(0.9, False)])) == pytest.approx(0.0)  # 90% said, 90% true
    assert calibration_error(_logged([(1.0, False)] * 4)) == pytest.approx(1.0)
    mixed = _logged([(0.05, False)] * 10 + [(0.75, True)] * 3 + [(0.75, False)])
    assert calibration_error(mixed) == pytest.approx((10 * 0.05 + 4 * 0.0) / 14)
    assert np.isnan(calibration_error([]))


def test_eval_freeform_prints_rows_per_tier_and_kind() -> None:
    result = CliRunner().invoke(app, ["eval", "freeform", "--n", "40", "--per-kind", "3", "--tiers", "mid", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {(r["tier"], r["kind"]) for r in report["rows"]} == {(t, k) for t in ("late", "mid", "auto") for k in KINDS}
    assert report["auto"]["margin"] > 0 and {"gain_share", "cost_share"} <= set(report["auto"])
    assert all(0.0 <= r["p1"] <= 1.0 and 0.0 <= r["p5"] <= 1.0 and r["queries"] == 3 for r in report["rows"])
    assert 0.0 <= report["calibration_error"]["mid"] <= 1.0 and set(report["examples"]) == set(KINDS)
    recall = {(r["tier"], r["kind"]): r["recall_at_k"] for r in report["rows"]}
    assert all(recall[(t, k)] == recall[("late", k)] for t, k in recall)  # a rerank reorders the same k candidates
    assert all(r["p1"] <= r["recall_at_k"] for r in report["rows"])  # so none is right more often than they hold one
    refused = CliRunner().invoke(app, ["eval", "freeform", "--seed", "1"])
    assert refused.exit_code == 2 and "validation" in refused.output


def test_auto_shares_weigh_each_kind_by_its_queries() -> None:
    rows = [{"tier": t, "kind": kind, "p1": p1, "rerank_ms_mean": ms, "queries": n}
            for t, kind, p1, ms, n in [("late", "a", 0.5, 0.0, 10), ("late", "b", 0.0, 0.0, 30),
                                       ("mid", "a", 1.0, 10.0, 10), ("mid", "b", 0.8, 10.0, 30),
                                       ("auto", "a", 1.0, 2.0, 10), ("auto", "b", 0.4, 4.0, 30)]]
    shares = auto_shares(rows, 0.03)
    assert shares["late_p1"] == pytest.approx(0.125) and shares["mid_p1"] == pytest.approx(0.85)
    assert shares["auto_p1"] == pytest.approx(0.55) and shares["gain_share"] == pytest.approx(0.425 / 0.725)
    assert shares["cost_share"] == pytest.approx(3.5 / 10.0)  # mean rerank ms, each kind weighed by its queries


def test_calibration_fit_recovers_an_over_confident_shifted_head() -> None:
    rng = np.random.default_rng(0)
    margins = rng.normal(0.0, 12.0, 20000)  # the head says margin m; the truth follows sigmoid(m / 4 - 1.5)
    true = rng.random(20000) < 1 / (1 + np.exp(-(margins / 4.0 - 1.5)))
    temperature, bias = best_calibration(margins, true)
    assert 3.5 < temperature < 4.6 and -1.8 < bias < -1.2
    said = [(float(-np.logaddexp(0, -m)), bool(t)) for m, t in zip(margins, true, strict=True)]  # log p
    fitted = -np.logaddexp(0, -(margins / temperature + bias))
    calibrated = [(float(lp), bool(t)) for lp, t in zip(fitted, true, strict=True)]
    assert calibration_error(calibrated) < 0.02 < 0.1 < calibration_error(said)


def test_margins_are_read_back_exactly_from_calibrated_log_p_even_where_p_rounds_to_one() -> None:
    raw = torch.tensor([-30.0, -4.0, 0.0, 2.5, 14.0, 40.0])  # the head's margins: some far past p = 1 - 1e-6
    cfg = RerankerConfig(kind="mid", temperature=1.3, bias=-2.1)
    log_p = Matcher.log_match(torch.stack([torch.zeros(6), raw], dim=1), cfg.temperature, cfg.bias)
    margins, labels = raw_margins([(float(lp), i % 2 == 0) for i, lp in enumerate(log_p)], cfg)
    np.testing.assert_allclose(margins, raw.numpy(), rtol=1e-4, atol=1e-3)
    assert labels.tolist() == [True, False, True, False, True, False]


def test_calibration_moves_log_p_without_reordering() -> None:
    logits = torch.tensor([[0.0, 6.0], [3.0, -3.0], [0.0, 1.0]])
    sharp, calibrated = Matcher.log_match(logits), Matcher.log_match(logits, 3.0, -0.5)
    assert torch.allclose(sharp, torch.log_softmax(logits, dim=-1)[:, 1])  # the defaults change nothing
    assert torch.equal(torch.argsort(sharp), torch.argsort(calibrated))
    assert calibrated[0] < sharp[0] and calibrated[1] > sharp[1]  # both pulled towards p = 0.5
    assert torch.allclose(calibrated.exp(), torch.sigmoid((logits[:, 1] - logits[:, 0]) / 3.0 - 0.5))


def test_calibrate_command_rewrites_the_checkpoint(tmp_path: Path) -> None:
    from indexer.encoder import MODELS_DIR

    checkpoint = tmp_path / "mid.safetensors"
    shutil.copy(MODELS_DIR / "reranker-mid.safetensors", checkpoint)
    args = ["train", "calibrate", "--checkpoint", str(checkpoint), "--val-n", "40", "--per-kind", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.stdout.strip().splitlines()[-1])
    cfg = load_reranker(checkpoint).cfg
    assert cfg.temperature == pytest.approx(fitted["temperature"]) and cfg.bias == pytest.approx(fitted["bias"])
    assert cfg.fusion_weight == fitted["fusion_weight"]
    assert 0.0 <= fitted["val_calibration_error"] <= 1.0
    missing = CliRunner().invoke(app, ["train", "calibrate", "--checkpoint", str(tmp_path / "none.safetensors")])
    assert missing.exit_code == 2 and "none.safetensors" in missing.output


def test_eval_reads_a_runs_encoder_and_rerankers_before_they_are_promoted(tmp_path: Path) -> None:
    from indexer.encoder import EMBEDDED_DIR, MODELS_DIR

    shutil.copy(MODELS_DIR / "reranker-mid.safetensors", tmp_path / "reranker-mid.safetensors")
    run = ["--encoder-weights", str(EMBEDDED_DIR / "open_clip_model.safetensors"), "--reranker-dir", str(tmp_path)]
    small = ["eval", "freeform", "--n", "20", "--per-kind", "2", "--tiers", "mid", "--json"]
    committed, result = CliRunner().invoke(app, small), CliRunner().invoke(app, [*small, *run])
    assert result.exit_code == committed.exit_code == 0, result.output
    def scores(output: str) -> list[tuple[str, str, float, float]]:  # the same models: the same answers
        return [(r["tier"], r["kind"], r["p1"], r["p5"]) for r in json.loads(output.splitlines()[-1])["rows"]]

    assert scores(result.stdout) == scores(committed.stdout)
    missing = CliRunner().invoke(app, ["eval", "tradeoff", "--n", "20", "--tiers", "early", *run])
    assert missing.exit_code == 2 and "reranker-early.safetensors" in missing.output
