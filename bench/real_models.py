"""Benchmark: the real-size models. ViT-B-32 indexing against its bare encode loop, text encode, a mid
reranker over ViT-B-32 tokens, BLIP base ITM at k = 16 (bytes per image of each tier's features: bench/tokens.py).

    python bench/real_models.py [--n 256] [--device cpu] [--out bench/results/real_models.json]

Random weights at the real sizes (none can be downloaded here): speed does not depend on the weights.
bench/gpu.sh runs it with --device cuda.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.index_throughput import bare_loop, in_process  # noqa: E402
from indexer.build import default_workers  # noqa: E402
from indexer.encoder import DualEncoder, EncoderSpec, load_encoder, save_fp16  # noqa: E402
from training.scenes import write_scenes  # noqa: E402

K = 16
QUERY = "a small red circle left of a large blue square"


def p50_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def vit_b32(root: Path, device: str, n: int, rounds: int) -> tuple[DualEncoder, dict[str, Any]]:
    """ViT-B-32 (random weights saved as a file, loaded as a user's would be): indexing / bare encode, text ms."""
    import open_clip

    torch.manual_seed(0)
    weights = save_fp16(open_clip.create_model("ViT-B-32"), root / "vit-b-32.safetensors")
    vit = load_encoder(EncoderSpec("ViT-B-32", str(weights), device))
    write_scenes(root / "src", n // 2, seed=99, twins=True)
    bare, piped = [], []
    for _ in range(rounds):  # interleaved, best of each: this machine's speed drifts
        bare.append(bare_loop(vit, root / "src", 64))
        piped.append(in_process(vit, root / "src", root / "idx", 64, default_workers()))
    out = {"n": n, "rounds": rounds, "workers": default_workers(), "bare_images_per_s": round(max(bare), 1),
           "pipeline_images_per_s": round(max(piped), 1), "ratio": round(max(piped) / max(bare), 3),
           "text_encode_ms_p50": p50_ms(lambda: vit.encode_texts_and_tokens([QUERY]), 30)}
    return vit, out


def mid_over_vit(vit: DualEncoder, runs: int) -> dict[str, Any]:
    """A mid reranker at the committed tier's size over ViT-B-32's 50 x 768 tokens, k candidates in one call."""
    from reranker.score import TokenReranker
    from training.reranker_train import RerankTrainConfig, new_matcher

    reranker = TokenReranker(new_matcher(vit, RerankTrainConfig(kind="mid")), vit)
    tokens = np.random.default_rng(0).standard_normal((K, *vit.token_shape)).astype(np.float16)
    query = reranker.prepare(QUERY)
    return {"k": K, "ms_p50": p50_ms(lambda: reranker.log_match(query, tokens), runs)}


def blip_base(root: Path, device: str, runs: int) -> dict[str, Any]:
    """HF BLIP ITM at base size (ViT-B/16 at 384 px, BERT base with cross-attention), saved and loaded from
    a folder as a user's would be: k candidates' ITM in one call, and the vision tower's index-time rate."""
    from PIL import Image
    from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval, BlipProcessor

    from reranker.blip import BlipReranker

    folder = root / "blip-base"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *QUERY.split()]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    BlipProcessor(image_processor=_blip_image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    BlipForImageTextRetrieval(BlipConfig()).save_pretrained(folder, safe_serialization=True)
    reranker = BlipReranker(folder, device)
    features = np.random.default_rng(0).standard_normal((K, *reranker.feature_shape)).astype(np.float16)
    query = reranker.prepare(QUERY)
    images = [Image.new("RGB", (256, 256), (200, 40, 40))] * 8
    pixels = torch.stack([reranker.preprocess_image(im) for im in images])
    vision_s = p50_ms(lambda: reranker.encode_pixels(pixels), max(1, runs // 2)) / 1000
    return {"k": K, "ms_p50": p50_ms(lambda: reranker.log_match(query, features), runs),
            "feature_shape": list(reranker.feature_shape), "vision_images_per_s": round(len(images) / vision_s, 1)}


def _blip_image_processor() -> Any:
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": 384, "width": 384})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256, help="scene images ViT-B-32 indexes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per reranker figure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/real_models.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vit, indexing = vit_b32(root, args.device, args.n, args.rounds)
        result = {"device": args.device, "torch_threads": torch.get_num_threads(), "vit_b32": indexing,
                  "mid_over_vit_b32": mid_over_vit(vit, args.runs),
                  "blip_base": blip_base(root, args.device, args.runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
