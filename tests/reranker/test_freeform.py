"""The freeform evaluation: its gallery, queries and truth, its calibration error on hand-made
predictions, and a small run end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.descriptions import KINDS, holds
from reranker.freeform import calibration_error, freeform_gallery, freeform_queries, truth
from service.cli import app


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


def test_calibration_error_of_hand_made_predictions() -> None:
    assert calibration_error([(0.9, True)] * 9 + [(0.9, False)]) == pytest.approx(0.0)  # 90% said, 90% true
    assert calibration_error([(1.0, False)] * 4) == pytest.approx(1.0)
    mixed = [(0.05, False)] * 10 + [(0.75, True)] * 3 + [(0.75, False)]
    assert calibration_error(mixed) == pytest.approx((10 * 0.05 + 4 * 0.0) / 14)
    assert np.isnan(calibration_error([]))


def test_eval_freeform_prints_rows_per_tier_and_kind() -> None:
    result = CliRunner().invoke(app, ["eval", "freeform", "--n", "40", "--per-kind", "3", "--tiers", "mid", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {(r["tier"], r["kind"]) for r in report["rows"]} == {(t, k) for t in ("late", "mid") for k in KINDS}
    assert all(0.0 <= r["p1"] <= 1.0 and 0.0 <= r["p5"] <= 1.0 and r["queries"] == 3 for r in report["rows"])
    assert 0.0 <= report["calibration_error"]["mid"] <= 1.0 and set(report["examples"]) == set(KINDS)
    refused = CliRunner().invoke(app, ["eval", "freeform", "--seed", "1"])
    assert refused.exit_code == 2 and "validation" in refused.output
