"""Benchmark: indexing pipeline images/s against the bare model loop, and peak RSS at two corpus sizes.

Usage: python bench/index_throughput.py [--n 5000] [--big 20000] [--out bench/results/index_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from indexer.encoder import load_encoder
from indexer.scenes import render, scene_pair, write_scenes


def bare_loop(n: int, batch: int) -> float:
    """images/s of encode_images_and_tokens on preprocessed tensors already in memory."""
    encoder = load_encoder()
    images = [render(scene_pair(99, i)[0].scene) for i in range(batch)]
    tensor = encoder.to_tensor(images)
    encoder.encode_images_and_tokens(tensor)  # warm-up
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        encoder.encode_images_and_tokens(tensor)
    return (max(1, n // batch) * batch) / (time.perf_counter() - start)


def pipeline(src: Path, out: Path, batch: int, workers: int) -> tuple[dict[str, float], int]:
    """Run `imsearch index build` in a child process; returns its JSON summary and peak RSS (KiB)."""
    cmd = [sys.executable, "-m", "indexer.cli", "index", "build", str(src), "--out", str(out), "--device", "cpu",
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
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/index_throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_scenes(root / "small", args.n // 2, seed=99, twins=True)
        bare = bare_loop(args.n, args.batch)
        small, rss_small = pipeline(root / "small", root / "idx-small", args.batch, args.workers)
        result = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "n": args.n, "batch": args.batch, "workers": args.workers,
            "bare_images_per_s": round(bare, 1),
            "pipeline_images_per_s": small["images_per_s"],
            "ratio": round(small["images_per_s"] / bare, 3),
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
