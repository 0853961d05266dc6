"""Command line, indexer floor: `imsearch index ...`, and the helpers all floors share."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)

ModelOpt = Annotated[
    str, typer.Option(help="open_clip architecture (tiny, ViT-B-32, ...), local-dir:PATH or a JSON config")
]
PretrainedOpt = Annotated[
    str | None, typer.Option(help="pretrained tag (laion2b_s34b_b79k) or weights file; default: embedded checkpoint")
]


def _device(value: str) -> str:
    from indexer.encoder import check_device

    try:
        return check_device(value)
    except ValueError as exc:
        fail(str(exc))  # one line, before any model or image is loaded


DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto", callback=_device)]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a clear error (no traceback) and exit."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run fn, turning expected failures into clear CLI errors."""
    from indexer.encoder import EncoderUnavailable

    try:
        return fn()
    except (EncoderUnavailable, OSError, ValueError) as exc:
        fail(str(exc))


JsonOpt = Annotated[bool, typer.Option("--json", help="print a JSON summary at the end")]
IndexDirOpt = Annotated[Path, typer.Option("--index", "-i", help="index directory")]


class IndexType(StrEnum):
    """FAISS index types `--index-type` accepts (auto: chosen by size and memory budget)."""

    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"


def _token_store(name: str | None) -> str | None:
    """`--tokens` checked before any model loads: a format indexer.tokens knows (its shape is checked at build)."""
    from indexer.tokens import parse_name

    if name is None:
        return None
    try:
        parse_name(name.lower())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return name.lower()


def _index_progress(description: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} images/s"), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
    )


def _run_ingest(src: Path, out: Path, mode: str, model: str, pretrained: str | None, device: str,
                opts: Any, as_json: bool) -> None:
    import time

    from indexer.build import build_or_add, check_replace, list_images
    from indexer.encoder import EncoderSpec, load_encoder

    if not src.exists():
        fail(f"source {src} does not exist")
    items = guarded(lambda: list_images(src))  # what can be refused is refused before any model loads
    if mode == "build":
        guarded(lambda: check_replace(out, opts))
    encoder = guarded(lambda: load_encoder(EncoderSpec(model, pretrained, device)))
    start = time.perf_counter()
    with _index_progress(mode) as bar:
        task = bar.add_task(f"{mode} {src.name}", total=None, rate=0.0)

        def progress(done: int, total: int, indexed: int) -> None:
            rate = indexed / max(1e-9, time.perf_counter() - start)
            bar.update(task, completed=done, total=total, rate=rate)

        report = guarded(lambda: build_or_add(src, out, encoder, opts, mode, progress, items))
    _print_report(report, as_json)


def _print_report(report: Any, as_json: bool) -> None:
    """The summary on stderr (or one JSON object on stdout): counts, then where the skipped files are listed."""
    summary = report.to_json()
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    shown = {k: v for k, v in summary.items() if k not in ("failures_file", "first_failures", "left_out")}
    err.print(", ".join(f"{k}={v}" for k, v in shown.items()), highlight=False, markup=False, soft_wrap=True)
    for left_out in report.left_out:
        err.print(f"not stored: {left_out}", highlight=False, markup=False, soft_wrap=True)
    if report.skipped or report.duplicates:
        where = f"all listed in {report.failures_file}" if report.failures_file else "no new version was published"
        err.print(f"skipped {report.skipped + report.duplicates} files ({where}); the first:", highlight=False,
                  markup=False, soft_wrap=True)
        for failure in report.first_failures:
            err.print(f"  {failure['path']}: {failure['reason']}", highlight=False, markup=False, soft_wrap=True)


def _feature_sources(tiers: str | None, device: str) -> tuple[Any, ...]:
    """What the tiers given (default: the served IMSEARCH_RERANKERS) need stored beside the dual encoder's tokens:
    blip its vision tower's features, mid its image side (a speed-up); early scores the tokens alone."""
    import os

    from reranker.score import KINDS, TIERS, load_blip, load_side, tier_entry

    entries = tiers.split(",") if tiers is not None else _served_tiers(os.environ.get("IMSEARCH_RERANKERS"))
    sources = []
    for kind, folder in (tier_entry(e) for e in entries if e.strip()):
        if kind not in KINDS:
            fail(f"unknown rerank tier {kind!r} in --tiers: use {', '.join(TIERS)} or blip=MODEL_DIR")
        if kind == "blip":
            if folder is None:
                fail("--tiers blip needs its model folder: --tiers blip=/models/blip-itm-base-coco")
            sources.append(guarded(partial(load_blip, folder, device)))
        elif (side := guarded(partial(load_side, kind, folder))) is not None:
            sources.append(side)
    return tuple(sources)


def _served_tiers(raw: str | None) -> list[str]:
    from reranker import DEFAULT_TIERS

    try:
        tiers = json.loads(raw) if raw else list(DEFAULT_TIERS)
    except ValueError:
        tiers = None
    if not isinstance(tiers, list) or not all(isinstance(t, str) for t in tiers):
        fail(f"IMSEARCH_RERANKERS must be a JSON list of tiers (e.g. [\"mid\", \"blip=/models/blip\"]), not {raw}")
    return tiers


def _options(batch_size: int, workers: int | None, index_type: IndexType, shard_size: int, max_pixels: int,
             memory_budget_mb: int | None, keep: int, ray: str | None = None, replace: bool = False,
             tokens: str | None = None, features: tuple[Any, ...] = ()) -> Any:
    from indexer.build import BuildOptions, default_workers
    from indexer.distributed import RayOptions

    budget = memory_budget_mb * 1024 * 1024 if memory_budget_mb else None
    cluster = None if ray is None else RayOptions(address=None if ray == "local" else ray)
    return BuildOptions(batch_size, default_workers() if workers is None else workers, shard_size, index_type.value,
                        budget, max_pixels, keep, cluster, replace, tokens=tokens,
                        features=features)


SrcArg = Annotated[Path, typer.Argument(help="folder, .txt of paths, or .jsonl/.parquet with a path column")]
BatchOpt = Annotated[int, typer.Option(min=1, max=4096, help="images per encoder batch")]
WorkersOpt = Annotated[
    int | None, typer.Option(min=0, max=64, help="decoding processes (0: in this process; default: cores - 2)")
]
IndexTypeOpt = Annotated[IndexType, typer.Option("--index-type", case_sensitive=False, help="FAISS index type")]
ShardOpt = Annotated[int, typer.Option(min=1, help="images per shard (the resume granularity)")]
PixelsOpt = Annotated[int, typer.Option(min=1, help="larger images are refused as decompression bombs")]
BudgetOpt = Annotated[int | None, typer.Option(help="memory for the ANN index in MiB (tight: IVF-PQ)")]
KeepOpt = Annotated[int, typer.Option(min=1, help="index versions to keep")]
TokensOpt = Annotated[str | None, typer.Option(callback=_token_store, help=(
    "how the rerankers' patch tokens are stored: fp16, int8 (half the bytes) or int4 (a quarter and less), "
    "+keepK to keep K patches and store the rest as their mean (int8+keep16: a seventh); "
    "default fp16, or for an add the index's own"))]
TiersOpt = Annotated[str | None, typer.Option("--tiers", help=(
    "the rerank tiers that will score this index, comma-separated as IMSEARCH_RERANKERS names them (mid, early, "
    "blip=MODEL_DIR): blip's vision features and mid's image side (a faster rerank) are computed and stored; "
    "default: IMSEARCH_RERANKERS"))]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", help="encode on Ray: 'local' starts one here, else a cluster address ('auto', 'ray://host:10001')")]


def index_build(
    src: SrcArg, index_dir: IndexDirOpt,
    model: ModelOpt = "tiny", pretrained: PretrainedOpt = None, device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64, workers: WorkersOpt = None, index_type: IndexTypeOpt = IndexType.auto,
    shard_size: ShardOpt = 2048, max_pixels: PixelsOpt = 64_000_000, memory_budget_mb: BudgetOpt = None,
    keep: KeepOpt = 3, ray: RayOpt = None, tokens: TokensOpt = None, tiers: TiersOpt = None,
    replace: Annotated[bool, typer.Option(help="replace the index already published in the folder")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode every image of SRC into a new index (resumable; on Ray with --ray)."""
    opts = _options(batch_size, workers, index_type, shard_size, max_pixels, memory_budget_mb, keep, ray, replace,
                    tokens, _feature_sources(tiers, device))
    _run_ingest(src, index_dir, "build", model, pretrained, device, opts, as_json)


def index_add(
    src: SrcArg, index_dir: IndexDirOpt,
    model: ModelOpt = "tiny", pretrained: PretrainedOpt = None, device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64, workers: WorkersOpt = None, index_type: IndexTypeOpt = IndexType.auto,
    shard_size: ShardOpt = 2048, max_pixels: PixelsOpt = 64_000_000, memory_budget_mb: BudgetOpt = None,
    keep: KeepOpt = 3, ray: RayOpt = None, tokens: TokensOpt = None, tiers: TiersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add new images (content-hash dedupe) and publish a new version."""
    opts = _options(batch_size, workers, index_type, shard_size, max_pixels, memory_budget_mb, keep, ray,
                    tokens=tokens, features=_feature_sources(tiers, device))
    _run_ingest(src, index_dir, "add", model, pretrained, device, opts, as_json)


def index_remove(
    index_dir: IndexDirOpt,
    paths: Annotated[list[str] | None, typer.Option("--paths", help="image paths to remove")] = None,
    ids: Annotated[list[int] | None, typer.Option("--ids", help="image ids to remove")] = None,
    keep: KeepOpt = 3, as_json: JsonOpt = False,
) -> None:
    """Remove images by path or id and publish a new version."""
    from indexer.build import BuildOptions, remove

    if not paths and not ids:
        fail("give --paths or --ids")
    report = guarded(lambda: remove(index_dir, paths, ids, BuildOptions(keep_versions=keep)))
    _print_report(report, as_json)


def index_info(index_dir: IndexDirOpt,
               as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest as JSON")] = False,
               ) -> None:
    """What the current version holds: count, model, index type, versions (the manifest with --json)."""
    from indexer.store import Index
    from indexer.versions import list_versions

    index = guarded(lambda: Index.open(index_dir))
    tokens = index.token_format.describe() if index.token_format else None  # also for versions written before
    manifest = {**index.manifest, "tokens": tokens}  # the manifest recorded it
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
        return
    plan = manifest["index"]
    lines = [f"{index_dir}: version {index.version} of {', '.join(list_versions(index_dir))}",
             f"images   {manifest['count']} ({len(index.deleted)} removed)",
             f"model    {manifest['model']['id']} (dim {manifest['dim']})",
             f"index    {plan['kind']}" + (f", {plan['nlist']} lists" if plan.get("nlist") else ""),
             f"tokens   {tokens['format']}, {tokens['bytes_per_image']:,} bytes per image" if tokens else "tokens   -",
             *(f"features {name}: {f['format']} {f['shape']}, {f['bytes_per_image']:,} bytes per image, model "
               f"{f['model']}" for name, f in index.feature_sets.items()),
             f"source   {manifest['source']}", f"created  {manifest['created']}"]
    sys.stdout.write("\n".join(lines) + "\n")


def index_verify(index_dir: IndexDirOpt,
                 version: Annotated[str | None, typer.Option(help="check this version only (default: every kept "
                                                                  "one, and CURRENT)")] = None,
                 as_json: JsonOpt = False) -> None:
    """Check every file of the kept versions against the size and sha256 recorded at publish; exit 1 on damage."""
    from indexer.verify import verify

    report = guarded(lambda: verify(index_dir, version))
    if as_json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        sys.stdout.write("\n".join(report.lines()) + "\n")
    if not report.clean:
        raise typer.Exit(1)


def register(index: typer.Typer) -> None:
    """Attach the indexer's commands to the `imsearch index` group."""
    index.command("build")(index_build)
    index.command("add")(index_add)
    index.command("remove")(index_remove)
    index.command("info")(index_info)
    index.command("verify")(index_verify)
