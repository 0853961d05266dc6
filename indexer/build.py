"""Indexer, orchestration: reader → encoder → writer shards → FAISS index → published version."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer import features
from indexer.ann import AnnPlan, build_index, plan_index, trainable
from indexer.distributed import EncodedBatch, RayOptions
from indexer.durable import mutation_lock, save_faiss, save_npy
from indexer.encoder import DualEncoder
from indexer.features import Source, TokenFeatures
from indexer.integrity import check_shard, read_manifest, read_npy
from indexer.layout import DELETED, FAILURES, INDEX_FILE, MANIFEST, SHARDS, STAGING, VERSIONS
from indexer.reader import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    TAKEN,
    Decoded,
    ImageDataset,
    SourceItem,
    list_source,
    make_loader,
)
from indexer.store import Index
from indexer.tokens import TokenFormat, token_format
from indexer.versions import current_version, link_shard, list_versions, publish
from indexer.writer import Failure, Row, ShardWriter, StagedShard, read_staged, recorded_files

Progress = Callable[[int, int, int], None]  # (items done, items total, images indexed)


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class BuildError(ValueError):
    """A build, add or remove that cannot proceed (bad output folder, model mismatch, nothing to do)."""


def default_workers() -> int:
    """Decoding processes: leave two cores to the encoder; on a 2-core machine decode in-process,
    since a worker would only steal the encoder's cores (measured in bench/index_throughput.py)."""
    return max(0, min(8, (os.cpu_count() or 1) - 2))


@dataclass
class BuildOptions:
    """Indexing settings (the CLI's flags)."""

    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    shard_size: int = 2048
    index_kind: str = "auto"
    memory_budget: int | None = None  # bytes for the ANN index; None = no limit
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_versions: int = 3
    ray: RayOptions | None = None  # encode on a Ray cluster instead of this process
    replace: bool = False  # a build may replace the folder's published index (else it is refused)
    tokens: str | None = None  # token store format (indexer.tokens.FORMATS); None: fp16, or an add's index's
    features: tuple[Source, ...] = ()  # rerank tiers' own features (vision towers, image sides), stored too
    roots: tuple[str, ...] = ()  # when set (indexing jobs), only files that resolve under these are read


@dataclass
class BuildReport:
    """What a mutation did; `to_json` is what `--json` prints."""

    indexed: int
    skipped: int
    duplicates: int
    removed: int
    seconds: float
    index_type: str
    version: str
    count: int
    failures_file: str | None = None  # every skipped file of this run with its reason (None: none, or unpublished)
    first_failures: list[dict[str, str]] = field(default_factory=list)  # the first few, for the summary
    left_out: list[str] = field(default_factory=list)  # feature sets asked for and not stored, each with why

    def to_json(self) -> dict[str, Any]:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        return {**asdict(self), "seconds": round(self.seconds, 3), "images_per_s": round(rate, 1)}


SHOWN_FAILURES = 5  # skipped files a summary names (all of them are in failures.jsonl)


def model_info(encoder: DualEncoder) -> dict[str, Any]:
    return {"id": encoder.model_id, "name": encoder.model_name, "config_hash": encoder.config_hash,
            "embed_dim": encoder.embed_dim, "token_shape": list(encoder.token_shape)}


def check_writable(out: Path) -> None:
    """Fail early, naming the folder, if the index cannot be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BuildError(f"cannot write the index to {out}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def disk_errors(out: Path) -> Iterator[None]:
    """A full disk while writing a version is the operator's to fix: say so, in one line.

    Nothing is lost: a version is published by one rename after all its files are written, so the
    served version stays as it was, and the completed shards of this run resume the next one.
    """
    try:
        yield
    except OSError as exc:  # index files are written through Python (durable.save_npy, durable.save_faiss)
        if exc.errno not in FULL_DISK:
            raise
        free = shutil.disk_usage(out if out.exists() else out.parent).free
        raise BuildError(f"No space left on device while writing a new version of {out} ({free} bytes free); "
                         "the served version is unchanged: free some space and run it again") from None


def check_replace(out: Path, opts: BuildOptions) -> None:
    """A build never replaces a published index by surprise: only with `replace`."""
    version = current_version(out)
    if version is not None and not opts.replace:
        raise BuildError(f"{out} already holds an index (version {version}): use `imsearch index add` to extend "
                         "it, or pass --replace to build a new collection in its place (the old versions are "
                         "kept as the --keep setting says)")


def choose_tokens(opts: BuildOptions, encoder: DualEncoder, parent: Index | None) -> TokenFormat:
    """The token store of a build (--tokens, fp16 unless given) or of an add: its index's (one format per index)."""
    kept = parent.token_format if parent is not None else None
    name = opts.tokens or (kept.name if kept else "fp16")
    if parent is not None and kept is not None and name != kept.name:
        raise BuildError(f"index {parent.root} stores its tokens as {kept.name}, and one index holds one format: "
                         f"leave --tokens out to add {kept.name} tokens, or rebuild it with --replace --tokens {name}")
    try:
        return token_format(name, encoder.token_shape)
    except ValueError as exc:
        raise BuildError(str(exc)) from None


def feature_formats(opts: BuildOptions, tokens: TokenFormat, parent: Index | None) -> dict[str, TokenFormat]:
    """How each tier's own features are stored; an add must bring what its index holds (features.mismatch)."""
    if features.pixel_sources(opts.features) and opts.ray is not None:
        raise BuildError("encoding on Ray computes the dual encoder's vectors only; index with --tiers without --ray")
    problem = features.mismatch(parent.feature_sets, opts.features, str(parent.root)) if parent else None
    if problem:
        raise BuildError(problem)
    try:
        return features.formats(opts.features, tokens)
    except ValueError as exc:
        raise BuildError(str(exc)) from None


def kept_sources(sources: tuple[Source, ...], encoder: DualEncoder,
                 parent: Index | None) -> tuple[tuple[Source, ...], list[str]]:
    """The feature sources a run computes, and those left out with why. An image side (from the dual encoder's
    tokens) is a speed-up the tier can do without: it is left out where it reads another encoder's tokens, and
    by an add whose index lacks it."""

    def why_not(source: Source) -> str | None:
        if not isinstance(source, TokenFeatures):
            return None
        if not encoder.is_model(source.encoder_id):
            return f"{source.features} (its tier reads the tokens of {source.encoder_id}, not {encoder.model_id})"
        if parent is not None and source.features not in parent.feature_sets:
            return f"{source.features} (the index holds none; a build with --replace and the tier stores one)"
        return None

    reasons = {s.features: why_not(s) for s in sources}
    return tuple(s for s in sources if reasons[s.features] is None), [r for r in reasons.values() if r]


def check_model(parent: Index, encoder: DualEncoder) -> None:
    built = parent.manifest["model"]["id"]
    if not encoder.is_model(built):
        raise BuildError(f"index {parent.root} was built with model {built}, not {encoder.model_id}; "
                          "use the same --model/--pretrained or build a new index")


# --- ingest: the streaming part -------------------------------------------------------------------


def _staging_dir(out: Path, mode: str, src: Path, encoder: DualEncoder, parent: str | None, tokens: str,
                 extra: list[str]) -> Path:
    key = json.dumps([mode, str(src.resolve()), encoder.model_id, parent, tokens, *extra])
    return out / STAGING / hashlib.sha1(key.encode()).hexdigest()[:12]


def _split(batch: list[Decoded], items: list[SourceItem], known: set[str]) -> tuple[list[Decoded], list[Failure], int]:
    """Good items, failures and the count of duplicates (bytes already indexed) in one batch."""
    good, failures, dups = [], [], 0
    for d in batch:
        path = items[d.position].path
        if d.tensor is None:
            failures.append(Failure(path, d.error or "unreadable"))
        elif d.sha256 in known:
            failures.append(Failure(path, "duplicate: the same bytes are already indexed"))
            dups += 1
        else:
            known.add(d.sha256)
            good.append(d)
    return good, failures, dups


def _batches(items: list[SourceItem], encoder: DualEncoder,
             opts: BuildOptions) -> Iterator[tuple[list[Decoded], EncodedBatch | None]]:
    """Decoded batches in source order: DataLoader workers here, or already encoded on Ray."""
    if opts.ray is None:
        extras = {f.features: f.preprocess_image for f in features.pixel_sources(opts.features)}
        dataset = ImageDataset(items, encoder.preprocess, opts.max_pixels, opts.roots, extras)
        loader = make_loader(dataset, opts.batch_size, opts.workers)
        for batch in loader:
            yield batch, None
        return
    from indexer.distributed import ray_batches

    if opts.roots:
        raise BuildError("encoding on Ray does not check allowed roots; run indexing jobs without Ray")
    shape = (3, *encoder.model.visual.image_size)
    for encoded in ray_batches(items, encoder.spec, encoder.preprocess, shape, opts.batch_size, opts.max_pixels,
                               opts.ray):
        yield encoded.decoded, encoded


def ingest(items: list[SourceItem], writer: ShardWriter, encoder: DualEncoder, known: set[str],
           opts: BuildOptions, progress: Progress | None = None) -> int:
    """Decode, encode in batches, write shards; returns the number of duplicates."""
    done = dups = indexed = 0
    for batch, encoded in _batches(items, encoder, opts):
        good, failures, batch_dups = _split(batch, items, known)
        dups += batch_dups
        emb, tok = _encode(encoder, good) if encoded is None else encoded.take(good)
        rows = [_row(items[d.position], d) for d in good]
        pixels = {f.features: [d.extra[f.features] for d in good] for f in features.pixel_sources(opts.features)}
        extra = features.encode(opts.features, pixels, tok)
        writer.add(rows, emb, tok, [items[d.position].path for d in batch], failures, extra)
        done, indexed = done + len(batch), indexed + len(good)
        if progress:
            progress(done, len(items), indexed)
    writer.flush()
    return dups


def _encode(encoder: DualEncoder, good: list[Decoded]) -> tuple[np.ndarray, np.ndarray]:
    if not good:
        return np.zeros((0, encoder.embed_dim), np.float32), np.zeros((0, *encoder.token_shape), np.float16)
    batch = torch.stack([d.tensor for d in good if d.tensor is not None])
    return encoder.encode_images_and_tokens(batch)


def _row(item: SourceItem, d: Decoded) -> Row:
    extra = {TAKEN: d.taken, **item.extra} if d.taken else item.extra  # the source list's own column wins
    return Row(item.path, d.sha256, d.width, d.height, item.caption, extra, d.size)


# --- publish: the per-version part ----------------------------------------------------------------


def _live_vectors(shard_dirs: Iterable[Path], deleted: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 vectors and (n,) ids of the live rows. Read, not mapped: a parent shard cut short
    is an IndexCorrupt naming its file, where a mapped page past its end would be a SIGBUS."""
    vecs, ids = [], []
    for folder in shard_dirs:
        shard_ids = read_npy(folder / "ids.npy")
        keep = ~np.isin(shard_ids, np.fromiter(deleted, np.int64, len(deleted)))
        if len(shard_ids):
            vecs.append(read_npy(folder / "emb.npy")[keep])
            ids.append(shard_ids[keep])
    if not vecs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32), np.concatenate(ids)


def _write_version(tmp: Path, shard_dirs: list[Path], deleted: set[int], failures: list[Failure],
                   opts: BuildOptions, dim: int) -> tuple[AnnPlan, int]:
    """Link shards, build the FAISS index over live vectors, write tombstones and failures."""
    for folder, entry in zip(shard_dirs, _shard_entries(shard_dirs), strict=True):
        check_shard(folder, entry)  # a shard damaged since it was written is never linked into a new version
        link_shard(folder, tmp / SHARDS)
    vectors, ids = _live_vectors(shard_dirs, deleted)
    if len(ids) == 0:
        vectors = np.zeros((0, dim), np.float32)
    plan = plan_index(len(ids), dim, opts.index_kind, opts.memory_budget)
    if not trainable(plan, len(ids)):
        plan = plan_index(len(ids), dim, "flat")  # too few vectors to train the quantizers
    save_faiss(tmp / INDEX_FILE, build_index(plan, vectors, ids))
    save_npy(tmp / DELETED, np.array(sorted(deleted), np.int64))
    (tmp / FAILURES).write_text("".join(f.to_json() + "\n" for f in failures))
    return plan, len(ids)


def _manifest(plan: AnnPlan, count: int, shard_dirs: list[Path], encoder_info: dict[str, Any], source: str,
              parent: Index | None, counts: dict[str, int], next_id: int, tokens: TokenFormat | None,
              feature_sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": encoder_info, "dim": encoder_info["embed_dim"], "count": count, "next_id": next_id,
        "index": plan.to_dict(), "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source, "roots": _roots(parent, source), "parent": parent.version if parent else None,
        "counts": counts, "shards": _shard_entries(shard_dirs),
        "tokens": tokens.describe() if tokens else None,  # how the rerankers' patch tokens are stored
        "features": feature_sets,  # rerank tiers' own image features: name → {model, format, shape, bytes_per_image}
    }


def _roots(parent: Index | None, source: str) -> list[str]:
    """Every source the version's images were listed from, the parent's first (hits show their paths
    relative to these)."""
    roots = list(parent.manifest.get("roots") or [parent.manifest["source"]]) if parent else []
    return roots if source in roots else [*roots, source]


def _shard_entries(shard_dirs: list[Path]) -> list[dict[str, Any]]:
    """Manifest entries {name, rows, files} of the shards: a parent version's are copied from its
    manifest (sizes and checksums are never recomputed), a new shard's come from its writer's marker."""
    parents: dict[Path, dict[str, dict[str, Any]]] = {}
    entries = []
    for folder in shard_dirs:
        version = folder.parent.parent
        if (version / MANIFEST).is_file():
            if version not in parents:
                parents[version] = {s["name"]: s for s in read_manifest(version)["shards"]}
            entries.append(dict(parents[version].get(folder.name) or _new_shard_entry(folder)))
        else:
            entries.append(_new_shard_entry(folder))
    return entries


def _new_shard_entry(folder: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": folder.name, "rows": len(read_npy(folder / "ids.npy"))}
    files = recorded_files(folder)
    if files:  # a shard staged before sizes and checksums were recorded has none
        entry["files"] = files
    return entry


# --- the three mutations --------------------------------------------------------------------------


def list_images(src: Path) -> list[SourceItem]:
    """The source's items; BuildError when it holds none (an empty version is never published)."""
    items = list_source(src)
    if not items:
        where = "" if src.is_file() else f" (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        raise BuildError(f"{src} {'lists' if src.is_file() else 'holds'} no images{where}; nothing to index")
    return items


def build_or_add(src: Path, out: Path, encoder: DualEncoder, opts: BuildOptions, mode: str = "build",
                 progress: Progress | None = None, items: list[SourceItem] | None = None) -> BuildReport:
    """Index `src` (its `items`, when already listed) into `out`: `build` starts a new collection, `add`
    extends the current version.

    Re-running after a crash resumes from the last completed shard of the same run.
    """
    start = time.perf_counter()
    items = items if items is not None else list_images(src)
    check_writable(out)
    with mutation_lock(out), disk_errors(out):
        if mode == "build":
            check_replace(out, opts)
        return _ingest_locked(src, out, encoder, opts, mode, progress, items, start)


def _ingest_locked(src: Path, out: Path, encoder: DualEncoder, opts: BuildOptions, mode: str,
                   progress: Progress | None, items: list[SourceItem], start: float) -> BuildReport:
    parent = Index.open(out) if mode == "add" else None
    if parent is not None:
        check_model(parent, encoder)
    kept, left_out = kept_sources(opts.features, encoder, parent)
    opts = replace(opts, features=kept)
    tokens = choose_tokens(opts, encoder, parent)
    stored = feature_formats(opts, tokens, parent)
    sets = {f.features: features.describe(f, stored[f.features]) for f in opts.features}
    staging = _staging_dir(out, mode, src, encoder, parent.version if parent else None, tokens.name,
                           [f"{name}@{info['model']}" for name, info in sets.items()])
    staged = read_staged(staging)
    known = _known_hashes(parent, staged)
    next_id = _next_id(out, staged)
    done = {p for s in staged for p in s.processed}
    todo = [it for it in items if it.path not in done]
    writer = ShardWriter(staging, staging.name, next_id, opts.shard_size, len(staged), tokens, stored)
    dups = ingest(todo, writer, encoder, known, opts, progress)
    shards = staged + writer.written
    report = _publish_ingest(out, src, encoder, opts, parent, shards, dups + _staged_dups(staged), (tokens, sets))
    shutil.rmtree(staging, ignore_errors=True)
    report.seconds, report.left_out = time.perf_counter() - start, left_out
    return report


def _next_id(out: Path, shards: list[StagedShard]) -> int:
    """Ids are never reused within an index folder, a rebuild (--replace) included: past every kept
    version's counter and every staged shard. So an id names one image, whichever version it came from."""
    candidates = [0]
    for version in list_versions(out):
        with contextlib.suppress(OSError, ValueError, KeyError):  # a damaged version: the others still count
            candidates.append(int(json.loads((out / VERSIONS / version / MANIFEST).read_text())["next_id"]))
    return max(candidates + [int(s.ids.max()) + 1 for s in shards if len(s.ids)])


def _known_hashes(parent: Index | None, staged: list[StagedShard]) -> set[str]:
    known = {h for s in staged for h in s.sha256}
    if parent is not None:
        known |= {row["sha256"] for row in parent.live_rows}
    return known


def _staged_dups(staged: list[StagedShard]) -> int:
    return sum(1 for s in staged for f in s.failures if f.reason.startswith("duplicate"))


def _publish_ingest(out: Path, src: Path, encoder: DualEncoder, opts: BuildOptions, parent: Index | None,
                    shards: list[StagedShard], dups: int,
                    stored: tuple[TokenFormat, dict[str, dict[str, Any]]]) -> BuildReport:
    failures = [f for s in shards for f in s.failures]
    new_dirs = [s.folder for s in shards if len(s.ids)]
    parent_dirs = [parent.folder / SHARDS / s.name for s in parent.shards] if parent else []
    deleted = set(parent.deleted) if parent else set()
    if parent is not None:  # a re-added path with new bytes replaces its old entry
        failed = {f.path for f in failures}
        new_paths = {p for s in shards for p in s.processed if p not in failed}
        deleted |= {int(r["id"]) for r in parent.live_rows if r["path"] in new_paths}
    indexed = sum(len(s.ids) for s in shards)
    next_id = _next_id(out, shards)
    counts = {"indexed": indexed, "skipped": len(failures) - dups, "duplicates": dups, "removed": 0}
    shown = [{"path": f.path, "reason": f.reason} for f in failures[:SHOWN_FAILURES]]
    if parent is not None and indexed == 0 and deleted == parent.deleted:  # nothing changed: no new version
        return BuildReport(0, counts["skipped"], dups, 0, 0.0, parent.plan.kind, parent.version, len(parent),
                           None, shown)
    result: dict[str, Any] = {}

    def fill(tmp: Path, name: str) -> dict[str, Any]:
        plan, count = _write_version(tmp, parent_dirs + new_dirs, deleted, failures, opts, encoder.embed_dim)
        result.update(plan=plan, count=count)
        return _manifest(plan, count, parent_dirs + new_dirs, model_info(encoder), str(src.resolve()), parent,
                         counts, next_id, *stored)

    version = publish(out, fill, keep=opts.keep_versions)
    listed = str(out / VERSIONS / version / FAILURES) if failures else None
    return BuildReport(indexed, counts["skipped"], dups, 0, 0.0, result["plan"].kind, version, result["count"],
                       listed, shown)


def remove(index_dir: Path, paths: list[str] | None = None, ids: list[int] | None = None,
           opts: BuildOptions | None = None) -> BuildReport:
    """Publish a version without the given images (by path or id); unknown ones are an error."""
    with mutation_lock(index_dir), disk_errors(index_dir):
        return _remove_locked(index_dir, paths, ids, opts or BuildOptions())


def _remove_locked(index_dir: Path, paths: list[str] | None, ids: list[int] | None,
                   opts: BuildOptions) -> BuildReport:
    start = time.perf_counter()
    parent = Index.open(index_dir)
    live = parent.ids()
    rows = parent.live_rows
    wanted_paths = {str(Path(p).resolve()) for p in paths or []} | set(paths or [])
    targets = {int(r["id"]) for r in rows if r["path"] in wanted_paths} | (set(ids or []) & set(live.tolist()))
    missing = (set(ids or []) - set(live.tolist())) if ids else set()
    if not targets:
        raise BuildError("nothing to remove: none of the given paths or ids is in the index")
    deleted = set(parent.deleted) | targets
    dirs = [parent.folder / SHARDS / s.name for s in parent.shards]
    result: dict[str, Any] = {}

    def fill(tmp: Path, name: str) -> dict[str, Any]:
        plan, count = _write_version(tmp, dirs, deleted, [], opts, parent.dim)
        result.update(plan=plan, count=count)
        counts = {"indexed": 0, "skipped": 0, "duplicates": 0, "removed": len(targets), "not_found": len(missing)}
        return _manifest(plan, count, dirs, parent.manifest["model"], parent.manifest["source"], parent, counts,
                         int(parent.manifest["next_id"]), parent.token_format, parent.feature_sets)

    version = publish(index_dir, fill, keep=opts.keep_versions)
    return BuildReport(0, 0, 0, len(targets), time.perf_counter() - start, result["plan"].kind, version,
                       result["count"])

