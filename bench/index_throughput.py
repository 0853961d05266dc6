"""Benchmark: indexing pipeline images/s against the bare model loop, and peak RSS at two corpus sizes.

Usage: python bench/index_throughput.py [--n 5000] [--big 20000] [--workers 0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder, load_encoder
from indexer.reader import decode_image
from training.scenes import write_scenes


def bare_loop(encoder: DualEncoder, src: Path, batch: int) -> float:
    """images/s of encode_images_and_tokens on distinct batches preprocessed beforehand (not timed)."""
    paths = sorted(src.glob("*.png"))
    tensors = [encoder.preprocess(decode_image(p.read_bytes())) for p in paths]
    batches = [torch.stack(tensors[i : i + batch]) for i in range(0, len(tensors), batch)]
    encoder.encode_images_and_tokens(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        encoder.encode_images_and_tokens(b)
    return len(tensors) / (time.perf_counter() - start)


def in_process(encoder: DualEncoder, src: Path, out: Path, batch: int, workers: int) -> float:
    """images/s of the full pipeline (read, hash, decode, preprocess, encode, write shards, publish)."""
    shutil.rmtree(out, ignore_errors=True)
    report = build_or_add(src, out, encoder, BuildOptions(batch_size=batch, workers=workers), "build")
    return report.indexed / report.seconds


def pipeline(src: Path, out: Path, batch: int, workers: int) -> tuple[dict[str, float], int]:
    """Run `imsearch index build` in a child process; returns its JSON summary and peak RSS (KiB)."""
    cmd = [sys.executable, "-m", "indexer.cli", "index", "build", str(src), "--index", str(out), "--device", "cpu",
           "--batch-size", str(batch), "--workers", str(workers), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(proc.stdout.strip().splitlines()[-1]), max(peak, before)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--big", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/index_throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_scenes(root / "small", args.n // 2, seed=99, twins=True)
        encoder = load_encoder()
        bare, piped = [], []
        for _ in range(args.rounds):  # interleaved, best of each: this machine's speed drifts
            bare.append(bare_loop(encoder, root / "small", args.batch))
            piped.append(in_process(encoder, root / "small", root / "idx", args.batch, args.workers))
        _, rss_small = pipeline(root / "small", root / "idx-small", args.batch, args.workers)
        result = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "n": args.n, "batch": args.batch, "workers": args.workers, "rounds": args.rounds,
            "bare_images_per_s": round(max(bare), 1),
            "pipeline_images_per_s": round(max(piped), 1),
            "ratio": round(max(piped) / max(bare), 3),
            "peak_rss_mib": {str(args.n): round(rss_small / 1024, 1)},
        }
        if args.big:
            write_scenes(root / "big", args.big // 2, seed=98, twins=True)
            _, rss_big = pipeline(root / "big", root / "idx-big", args.batch, args.workers)
            result["peak_rss_mib"][str(args.big)] = round(rss_big / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
