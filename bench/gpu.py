"""Benchmark: GPU encode throughput (ViT-B-32, tiny) and FAISS GPU search, as one JSON file.

    python bench/gpu.py --out bench/results/gpu.json            # on a GPU machine (bench/gpu.sh)
    python bench/gpu.py --quick --device cpu --out /tmp/g.json  # a smoke run of the same code on CPU

(1) encode from decoded tensors: images/s of `encode_images_and_tokens` on random pixels, bf16
    autocast on CUDA, ViT-B-32 with random weights (speed does not depend on the weights) and tiny;
(2) the full pipeline: `build_or_add` over scene PNGs (read, hash, decode, preprocess, encode, write
    shards, FAISS, publish), images/s, and its ratio to (1) for the same model;
(3) FAISS: flat inner-product search of 1k queries over 1M and 10M vectors on the GPU (faiss-gpu),
    and an IVF index trained on the GPU, queries/s and recall@10 against the flat result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_encode(encoder: Any, batch: int, seconds: float) -> float:
    """images/s over `seconds` of back-to-back batches (after a warm-up)."""
    size = int(encoder.model.visual.image_size[0])
    pixels = torch.randn(batch, 3, size, size)
    if encoder.device.type == "cuda":
        pixels = pixels.pin_memory()
    for _ in range(3):
        encoder.encode_images_and_tokens(pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode_images_and_tokens(pixels)
        done += batch
    return done / (time.perf_counter() - start)


def encode_rates(device: str, quick: bool) -> dict[str, Any]:
    import open_clip

    from indexer.encoder import DualEncoder, EncoderSpec, load_encoder

    out: dict[str, Any] = {}
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", device=device)  # random weights
    vit = DualEncoder(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32@random", torch.device(device),
                      "ViT-B-32")
    out["vit_b32_tensors_images_per_s"] = round(timed_encode(vit, 8 if quick else 512, 2 if quick else 20), 1)
    tiny = load_encoder(EncoderSpec(device=device))
    out["tiny_tensors_images_per_s"] = round(timed_encode(tiny, 64 if quick else 2048, 2 if quick else 15), 1)
    return out


def pipeline_rate(device: str, n: int, model: str) -> float:
    """images/s of the whole build over n scene PNGs (written first, not timed)."""
    import open_clip

    from indexer.build import BuildOptions, build_or_add
    from indexer.encoder import DualEncoder, EncoderSpec, load_encoder
    from training.scenes import write_scenes

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    manifest = write_scenes(work / "src", n // 2, seed=9, twins=True, size=224 if model == "ViT-B-32" else 64)
    if model == "ViT-B-32":
        net, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", device=device)
        encoder = DualEncoder(net, preprocess, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32@random",
                              torch.device(device), "ViT-B-32")
    else:
        encoder = load_encoder(EncoderSpec(device=device))
    workers = max(0, min(16, (os.cpu_count() or 2) - 2))
    opts = BuildOptions(batch_size=512 if device == "cuda" else 32, workers=workers, shard_size=8192)
    report = build_or_add(manifest, work / "idx", encoder, opts, "build")
    return report.indexed / report.seconds


def faiss_rates(n: int, dim: int, queries: int, gpu: bool) -> dict[str, Any]:
    import faiss

    sys.path.insert(0, str(ROOT / "bench"))
    from ann import clustered  # the same clustered, L2-normalised vectors as bench/ann.py

    rng = np.random.default_rng(0)
    base = clustered(n, dim, seed=0)
    q = base[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat: Any = faiss.IndexFlatIP(dim)
    if gpu:
        flat = faiss.index_cpu_to_all_gpus(flat)
    flat.add(base)
    start = time.perf_counter()
    _, exact = flat.search(q, 10)
    flat_s = time.perf_counter() - start
    nlist = int(4 * np.sqrt(n))
    ivf: Any = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if gpu:
        ivf = faiss.index_cpu_to_all_gpus(ivf)
    start = time.perf_counter()
    ivf.train(base[rng.choice(n, min(n, 64 * nlist), replace=False)])
    ivf.add(base)
    build_s = time.perf_counter() - start
    faiss.GpuParameterSpace().set_index_parameter(ivf, "nprobe", 64) if gpu else setattr(ivf, "nprobe", 64)
    start = time.perf_counter()
    _, approx = ivf.search(q, 10)
    ivf_s = time.perf_counter() - start
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]))
    return {"n": n, "flat_qps": round(queries / flat_s, 1), "ivf_build_s": round(build_s, 2), "ivf_nlist": nlist,
            "ivf_nprobe": 64, "ivf_qps": round(queries / ivf_s, 1), "ivf_recall_at_10": round(recall, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import faiss

    gpu = args.device == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    result: dict[str, Any] = {"device": args.device, "gpu_name": torch.cuda.get_device_name(0) if args.device == "cuda"
                              else None, "cpus": os.cpu_count(), "faiss_gpu": gpu, "torch": torch.__version__}
    result.update(encode_rates(args.device, args.quick))
    n_pipe = 200 if args.quick else 20_000
    result["vit_b32_pipeline_images_per_s"] = round(pipeline_rate(args.device, n_pipe, "ViT-B-32"), 1)
    result["vit_b32_pipeline_ratio"] = round(result["vit_b32_pipeline_images_per_s"]
                                             / result["vit_b32_tensors_images_per_s"], 3)
    result["tiny_pipeline_images_per_s"] = round(pipeline_rate(args.device, n_pipe, "tiny"), 1)
    sizes = (20_000,) if args.quick else (1_000_000, 10_000_000)
    result["faiss"] = [faiss_rates(n, 512, 1000, gpu) for n in sizes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
