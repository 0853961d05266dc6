"""Command line, training floor: `scenes`, `train encoder|reranker|calibrate`, `eval encoder|tradeoff|freeform`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from indexer.cli import DeviceOpt, ModelOpt, PretrainedOpt, err, fail, guarded
from training.scenes import EVAL_SEED, TRAIN_SEED, VAL_SEED

if TYPE_CHECKING:
    from indexer.encoder import DualEncoder, EncoderSpec
    from reranker.score import Reranker, TokenReranker
    from training.reranker_train import RerankTrainConfig

CALIBRATION_PER_KIND = 40  # 7 kinds x 40 descriptions x 16 candidates: about 4,500 scored pairs

EncoderWeightsOpt = Annotated[Path | None, typer.Option(help="the embedded encoder's weights (default: "
                                                     "models/tiny-clip), e.g. a training run's")]
RerankerDirOpt = Annotated[Path | None, typer.Option(help="read reranker-TIER.safetensors from this folder "
                                                   "(default: models/), e.g. models/runs")]
KindOpt = Annotated[str, typer.Option(help="mid (cross-attention ITM) or early (single stream)")]
HeldOutSeedOpt = Annotated[int, typer.Option(help="gallery seed (disjoint from training and validation)")]
TiersOpt = Annotated[str, typer.Option(help="comma-separated rerank tiers")]


def _held_out(seed: int) -> None:
    if seed in (TRAIN_SEED, VAL_SEED):
        fail(f"seed {seed} is used for training or validation; evaluate on a held-out seed")


def scenes(
    out_dir: Annotated[Path, typer.Argument(help="folder for the PNGs and captions.jsonl")],
    n: Annotated[int, typer.Option(min=1, help="number of scenes")] = 1000,
    seed: Annotated[int, typer.Option(help="stream seed")] = EVAL_SEED,
    twins: Annotated[bool, typer.Option(help="also write each scene's hard twin")] = False,
    size: Annotated[int, typer.Option(min=16, max=1024, help="image side in pixels")] = 64,
) -> None:
    """Generate captioned synthetic scenes (PNG + captions.jsonl)."""
    from training.scenes import write_scenes

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"{out_dir} exists and is not a directory")
    manifest = guarded(lambda: write_scenes(out_dir, n, seed, twins=twins, size=size))
    count = n * (2 if twins else 1)
    err.print(f"wrote {count} images and {manifest}")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
    )


def train_encoder_cmd(
    steps: Annotated[int, typer.Option(min=1)] = 2500,
    out: Annotated[Path | None, typer.Option(help="checkpoint folder (default: models/tiny-clip)")] = None,
    seed: Annotated[int, typer.Option()] = TRAIN_SEED,
    batch_pairs: Annotated[int, typer.Option(min=2, help="scene/twin pairs per batch")] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 5e-4,
    eval_every: Annotated[int, typer.Option(min=0, help="validate every N steps (0: never)")] = 250,
    init: Annotated[Path | None, typer.Option(help="continue from these weights with a new schedule")] = None,
    start_step: Annotated[int, typer.Option(min=0, help="offset into the scene stream")] = 0,
    describe_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of texts written as people "
                                                  "write them, not in the caption grammar")] = 0.0,
    warmup: Annotated[int, typer.Option(min=1)] = 150,
) -> None:
    """Train the embedded `tiny` dual encoder contrastively on streamed scenes; a rerun with the same
    --out resumes from the run's last save (every 100 steps)."""
    from training.encoder_train import RUN_LOG, TrainConfig, train_encoder

    if seed == EVAL_SEED or seed == 7:
        fail(f"seed {seed} is reserved for evaluation; pick another training seed")
    cfg = TrainConfig(steps=steps, seed=seed, batch_pairs=batch_pairs, lr=lr, eval_every=eval_every, init=init,
                      start_step=start_step, describe_share=describe_share, warmup=warmup,
                      command=" ".join(["imsearch", *sys.argv[1:]]))
    if out is not None:
        cfg.out = out
    if (cfg.out / RUN_LOG).is_file():
        err.print(f"resuming the run saved in {cfg.out}")
    with progress_bar() as bar:
        task = bar.add_task("train encoder", total=steps, loss=float("nan"))
        report = train_encoder(cfg, lambda step, loss: bar.update(task, completed=step + 1, loss=loss))
    err.print(f"saved {cfg.out} after {report['seconds']} s")


def eval_encoder_cmd(
    n: Annotated[int, typer.Option(min=2, help="gallery size (even)")] = 1000,
    seed: Annotated[int, typer.Option(help="gallery seed (disjoint from training)")] = EVAL_SEED,
    model: ModelOpt = "tiny",
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Text→image recall and binding accuracy on a deduplicated twin gallery."""
    from indexer.encoder import EncoderSpec, load_encoder
    from training.encoder_eval import evaluate_encoder

    if seed in (TRAIN_SEED,):
        fail(f"seed {seed} is the training seed; evaluate on a held-out seed")
    encoder = guarded(lambda: load_encoder(EncoderSpec(model, pretrained, device)))
    metrics = guarded(lambda: evaluate_encoder(encoder, n=n, seed=seed))
    if as_json:
        sys.stdout.write(json.dumps(metrics) + "\n")
        return
    for key, value in metrics.items():
        sys.stdout.write(f"{key:>12}: {value}\n")


def train_reranker_cmd(
    kind: KindOpt = "mid",
    steps: Annotated[int, typer.Option(min=1)] = 1500,
    batch: Annotated[int, typer.Option(min=2, help="positives per step (each with 5 negatives)")] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-4,
    layers: Annotated[int | None, typer.Option(min=1, max=12, help="blocks (default 3; with --init its own, or fewer: "
                                               "its first ones)")] = None,
    ground_weight: Annotated[float, typer.Option(min=0.0, help="auxiliary grounding loss (0: off)")] = 1.0,
    val_n: Annotated[int, typer.Option(min=2, help="validation gallery for the fusion weight")] = 2000,
    out: Annotated[Path | None, typer.Option(help="checkpoint (default models/reranker-KIND.safetensors)")] = None,
    init: Annotated[Path | None, typer.Option(help="continue training this checkpoint (warm start)")] = None,
    teacher: Annotated[Path | None, typer.Option(help="distil this reranker's p(match) of every pair (a deeper "
                                                 "checkpoint of the same kind, e.g. for a --layers cut)")] = None,
    first_step: Annotated[int, typer.Option(min=0, help="skip this many steps of the scene stream")] = 0,
    image_mix: Annotated[int, typer.Option(min=0, help="image-side neighbourhood block width (0: none)")] = 0,
    shape_negatives: Annotated[bool, typer.Option(help="a 6th negative: the image with one shape changed")] = False,
    layout_negatives: Annotated[bool, typer.Option(help="a 7th: the image transposed, a row made a column "
                                                   "(needs --shape-negatives)")] = False,
    describe_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of positives described as "
                                                  "people write them, not in the caption grammar")] = 0.0,
    hard_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of described positives asked a "
                                              "hard kind their scene allows (two of three, a count, no sizes)")] = 0.0,
    warmup: Annotated[int, typer.Option(min=1)] = 100,
    encoder_weights: Annotated[Path | None, typer.Option(help="the embedded encoder's weights to train over "
                                                         "(default: models/tiny-clip)")] = None,
    data: Annotated[Path | None, typer.Option(help="train on your own captioned images instead of scenes: an "
                                              "index built from a .jsonl/.parquet with captions (needs --out)")] = None,
    model: ModelOpt = "tiny", pretrained: PretrainedOpt = None, device: DeviceOpt = "cpu",
) -> None:
    """Train a reranker on the frozen embedded encoder, then fit its score fusion on validation scenes;
    with --data, on an index's captioned images for any open_clip encoder (--model, --pretrained).

    The run saves its weights every 100 steps; a rerun with the same --out resumes it."""
    from indexer.encoder import EncoderSpec, load_encoder
    from reranker.model import save_reranker
    from reranker.score import TokenReranker
    from training.reranker_train import RerankTrainConfig, train_reranker

    if kind not in ("mid", "early"):
        fail(f"unknown reranker kind {kind!r}: use mid or early")
    if data is not None:
        scene_only = {"--shape-negatives": shape_negatives, "--layout-negatives": layout_negatives,
                      "--describe-share": describe_share, "--hard-share": hard_share,
                      "--encoder-weights": encoder_weights}
        _train_on_captions(kind, data, EncoderSpec(model, pretrained, device), RerankTrainConfig(
            kind=kind, steps=steps, batch=batch, lr=lr, layers=layers, out=out, ground_weight=0.0, init=init,
            first_step=first_step, image_mix=image_mix, warmup=warmup, command=" ".join(["imsearch", *sys.argv[1:]])),
            [k for k, v in scene_only.items() if v])
        return
    spec = EncoderSpec(pretrained=str(encoder_weights)) if encoder_weights else None
    encoder = guarded(lambda: load_encoder(spec))
    cfg = guarded(lambda: RerankTrainConfig(
        kind=kind, steps=steps, batch=batch, lr=lr, layers=layers, out=out, ground_weight=ground_weight, init=init,
        first_step=first_step, image_mix=image_mix, shape_negatives=shape_negatives, layout_negatives=layout_negatives,
        describe_share=describe_share, hard_share=hard_share, warmup=warmup, teacher=teacher,
        command=" ".join(["imsearch", *sys.argv[1:]])))
    matcher, log = _run_training(cfg, partial(train_reranker, encoder, cfg))
    fitted = _calibrate(TokenReranker(matcher, encoder), val_n, CALIBRATION_PER_KIND)
    path = save_reranker(matcher, cfg.path())
    _write_summary(path, matcher, log, fitted, init=str(init) if init else None, first_step=first_step,
                   image_mix=matcher.cfg.image_mix, negatives=cfg.negatives, describe_share=describe_share,
                   hard_share=hard_share)


def _run_training(cfg: RerankTrainConfig, train: Callable[..., Any]) -> Any:
    """`train(on_step)` under a progress bar (saying so when it resumes a saved run)."""
    if cfg.run_log().is_file():
        err.print(f"resuming the run saved in {cfg.run_log()}")
    with progress_bar() as bar:
        task = bar.add_task(f"train {cfg.kind} reranker", total=cfg.steps, loss=float("nan"))

        def advance(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, loss=loss)

        return guarded(lambda: train(advance))


def _write_summary(path: Path, model: Any, log: dict[str, Any], fitted: dict[str, Any], **extra: Any) -> None:
    """The checkpoint's JSON beside it: the run's settings, fit, size, commands and loss curve."""
    summary = {"kind": model.cfg.kind, "steps": len(log["losses"]), **extra, "seconds": log["seconds"], **fitted,
               "parameters": sum(p.numel() for p in model.parameters()), "bytes": path.stat().st_size,
               "commands": log["commands"]}
    path.with_suffix(".json").write_text(json.dumps({**summary, "losses": log["losses"]}) + "\n")
    err.print(json.dumps(summary))


def _train_on_captions(kind: str, data: Path, spec: EncoderSpec, cfg: RerankTrainConfig, scene_only: list[str]) -> None:
    """The generic recipe (training.captions_train) on an index's captioned images."""
    from indexer.encoder import load_encoder
    from indexer.store import Index
    from reranker.model import save_reranker
    from reranker.score import TokenReranker
    from training.captions_train import caption_pairs, fit_on_captions, load_captions
    from training.reranker_train import train_reranker

    if scene_only:
        fail(f"{', '.join(scene_only)} belong to the scene recipe; --data trains on the index's own captions")
    if cfg.out is None:
        fail("--data needs --out: the committed models/reranker-KIND.safetensors serve the embedded model")
    encoder = guarded(lambda: load_encoder(spec))
    index = guarded(lambda: Index.open(data))
    if not encoder.is_model(index.manifest["model"]["id"]):
        fail(f"index {data} was built with {index.manifest['model']['id']}, not {encoder.model_id}: pass the "
             "--model and --pretrained it was built with")
    captions = guarded(lambda: load_captions(index, cfg.seed))
    model, log = _run_training(cfg, lambda on_step: train_reranker(
        encoder, cfg, on_step, lambda step: caption_pairs(encoder, captions, cfg, step)))
    fitted = guarded(lambda: fit_on_captions(TokenReranker(model, encoder), captions))
    path = save_reranker(model, cfg.out)
    _write_summary(path, model, log, fitted, init=str(cfg.init) if cfg.init else None, data=str(data),
                   encoder=encoder.model_id, tokens=index.token_format.name if index.token_format else None)


def _calibrate(reranker: TokenReranker, val_n: int, per_kind: int) -> dict[str, float]:
    """Fit p(match)'s calibration on validation descriptions, then the cosine fusion weight over the
    calibrated log p (the weight is fitted second because calibrating rescales what it is added to)."""
    from training.freeform import fit_calibration
    from training.tradeoff import fit_fusion_weight

    temperature, bias, val_error = fit_calibration(reranker.encoder, reranker, val_n, VAL_SEED, per_kind)
    weight, val_r1 = fit_fusion_weight(reranker.encoder, reranker, val_n, VAL_SEED)
    reranker.matcher.cfg.fusion_weight = reranker.fusion_weight = weight
    return {"temperature": temperature, "bias": bias, "val_calibration_error": val_error, "fusion_weight": weight,
            "val_r1_at_16": val_r1}


def calibrate_cmd(
    kind: KindOpt = "mid",
    checkpoint: Annotated[Path | None, typer.Option(help="a reranker checkpoint (default: the committed "
                                                    "models/reranker-KIND.safetensors)")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write it (default: over the checkpoint)")] = None,
    val_n: Annotated[int, typer.Option(min=2, help="validation gallery: n/2 scenes and their twins")] = 2000,
    per_kind: Annotated[int, typer.Option(min=1, help="validation descriptions of each kind")] = CALIBRATION_PER_KIND,
    encoder_weights: EncoderWeightsOpt = None,
) -> None:
    """Refit a trained reranker's p(match) calibration (temperature, bias) and fusion weight on the
    validation seed."""
    from indexer.encoder import MODELS_DIR, EncoderSpec, load_encoder
    from reranker.model import load_reranker, save_reranker
    from reranker.score import TokenReranker

    checkpoint = checkpoint or MODELS_DIR / f"reranker-{kind}.safetensors"
    spec = EncoderSpec(pretrained=str(encoder_weights)) if encoder_weights else None
    encoder = guarded(lambda: load_encoder(spec))
    model = guarded(lambda: load_reranker(checkpoint))
    fitted = _calibrate(guarded(lambda: TokenReranker(model, encoder)), val_n, per_kind)
    path = save_reranker(model, out or checkpoint)
    summary = checkpoint.with_suffix(".json")
    if summary.is_file():
        path.with_suffix(".json").write_text(json.dumps({**json.loads(summary.read_text()), **fitted}) + "\n")
    sys.stdout.write(json.dumps(fitted) + "\n")


def _models(tiers: str, encoder_weights: Path | None, reranker_dir: Path | None
            ) -> tuple[DualEncoder, dict[str, Reranker]]:
    """The encoder and the rerank tiers to evaluate: the committed ones, or a run's before it is promoted."""
    from indexer.encoder import EncoderSpec, load_encoder
    from reranker.score import load_tier

    encoder = guarded(lambda: load_encoder(EncoderSpec(pretrained=str(encoder_weights)) if encoder_weights else None))
    paths = {t: reranker_dir / f"reranker-{t}.safetensors" if reranker_dir else None for t in tiers.split(",") if t}
    return encoder, {t: guarded(partial(load_tier, t, encoder, path)) for t, path in paths.items()}


def _emit(rows: list[dict[str, Any]] | dict[str, Any], as_json: bool) -> None:
    """An eval's rows (or one row) as one JSON value, or as key=value lines."""
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    for row in rows if isinstance(rows, list) else [rows]:
        line = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        sys.stdout.write(line + "\n")


def eval_tradeoff_cmd(
    n: Annotated[int, typer.Option(min=2, help="gallery size (even)")] = 1000,
    seed: HeldOutSeedOpt = EVAL_SEED,
    tiers: TiersOpt = "mid,early",
    ks: Annotated[str, typer.Option(help="comma-separated candidate counts")] = "8,16,32,64",
    errors: Annotated[bool, typer.Option("--errors", help="break top-1 errors down by kind")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON list")] = False,
    encoder_weights: EncoderWeightsOpt = None,
    reranker_dir: RerankerDirOpt = None,
) -> None:
    """Late vs mid vs early fusion: R@1, R@5, binding accuracy and ms per query at each k."""
    from training.tradeoff import evaluate_tradeoff

    _held_out(seed)
    encoder, rerankers = _models(tiers, encoder_weights, reranker_dir)
    k_values = tuple(int(k) for k in ks.split(",") if k)
    _emit(guarded(lambda: evaluate_tradeoff(encoder, rerankers, n, seed, k_values, errors)), as_json)


def eval_freeform_cmd(
    n: Annotated[int, typer.Option(min=2, help="gallery size: n/2 scenes and their twins")] = 1000,
    seed: HeldOutSeedOpt = EVAL_SEED,
    per_kind: Annotated[int, typer.Option(min=1, help="queries of each kind")] = 150,
    k: Annotated[int, typer.Option(min=1, max=256, help="candidates each reranker rescores")] = 16,
    tiers: TiersOpt = "mid,early",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    encoder_weights: EncoderWeightsOpt = None,
    reranker_dir: RerankerDirOpt = None,
) -> None:
    """Queries as people type them: p@1, p@5 and ms per tier and kind (rerank "auto" too, when mid is among the
    tiers); the rerankers' calibration error."""
    from reranker.gate import AUTO_MARGIN
    from training.freeform import evaluate_freeform

    _held_out(seed)
    encoder, rerankers = _models(tiers, encoder_weights, reranker_dir)
    report = guarded(lambda: evaluate_freeform(encoder, rerankers, n, seed, per_kind, k, AUTO_MARGIN))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    for row in report["rows"]:
        sys.stdout.write(f"{row['tier']:>6} {row['kind']:<17} p@1 {row['p1']:.3f}  p@5 {row['p5']:.3f}  "
                         f"{row['ms_p50']:.1f} ms  ({row['queries']} queries)\n")
    for tier, error in report["calibration_error"].items():
        sys.stdout.write(f"{tier} calibration error of p(match): {error:.3f}\n")
    if report["auto"]:
        _emit(report["auto"], False)


def eval_gate_cmd(
    n: Annotated[int, typer.Option(min=2, help="gallery size (even)")] = 1000,
    seed: HeldOutSeedOpt = EVAL_SEED,
    margin: Annotated[float | None, typer.Option(help="the gate's margin (default: the served one)")] = None,
    fit: Annotated[bool, typer.Option("--fit", help="first fit the margin on the validation seed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    encoder_weights: EncoderWeightsOpt = None,
    reranker_dir: RerankerDirOpt = None,
) -> None:
    """rerank "auto": R@1 and mean rerank cost of reranking only the candidates within the margin of the best
    cosine (when two or more are), beside late and mid at k = 16 on the twin gallery."""
    from reranker.gate import AUTO_MARGIN
    from training.tradeoff import fit_gate, gate_figures, gate_run

    _held_out(seed)
    encoder, rerankers = _models("mid", encoder_weights, reranker_dir)
    chosen = margin if margin is not None else AUTO_MARGIN
    fitted = fit_gate(gate_run(encoder, rerankers["mid"], n, VAL_SEED)) if fit else None
    row = {"seed": seed, "n": n, **gate_figures(gate_run(encoder, rerankers["mid"], n, seed), fitted or chosen),
           "fitted_on_seed": VAL_SEED if fit else None}
    _emit(row, as_json)


def eval_explain_cmd(
    n: Annotated[int, typer.Option(min=2, help="gallery size (even)")] = 1000,
    seed: HeldOutSeedOpt = EVAL_SEED,
    tiers: TiersOpt = "mid,early",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON list")] = False,
    encoder_weights: EncoderWeightsOpt = None,
    reranker_dir: RerankerDirOpt = None,
) -> None:
    """Explain: the share of the objects each twin-gallery caption names that the tier locates inside them,
    on the caption's own image."""
    from training.tradeoff import explain_figures

    _held_out(seed)
    encoder, rerankers = _models(tiers, encoder_weights, reranker_dir)
    _emit([guarded(partial(explain_figures, encoder, r, n, seed)) for r in rerankers.values()], as_json)


def register(root: typer.Typer, train: typer.Typer, evaluate: typer.Typer) -> None:
    """Attach the training floor's commands to the root CLI and its groups."""
    root.command()(scenes)
    train.command("encoder")(train_encoder_cmd)
    evaluate.command("encoder")(eval_encoder_cmd)
    train.command("reranker")(train_reranker_cmd)
    train.command("calibrate")(calibrate_cmd)
    evaluate.command("tradeoff")(eval_tradeoff_cmd)
    evaluate.command("freeform")(eval_freeform_cmd)
    evaluate.command("gate")(eval_gate_cmd)
    evaluate.command("explain")(eval_explain_cmd)
