"""Indexer, encode: one dual-encoder interface over open_clip (the embedded tiny model or any pretrained)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

log = logging.getLogger(__name__)

EMBEDDED = "tiny"
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# the committed checkpoints; an installed package (a container) points here with IMSEARCH_MODELS_DIR
MODELS_DIR = Path(os.environ.get("IMSEARCH_MODELS_DIR") or Path(__file__).resolve().parent.parent / "models")
EMBEDDED_DIR = MODELS_DIR / "tiny-clip"  # open_clip `local-dir:` layout: config JSON + safetensors
WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
CONFIG_NAME = "open_clip_config.json"

ImageBatch = torch.Tensor | Sequence[Image.Image]


class EncoderUnavailable(RuntimeError):
    """The requested model or its weights cannot be loaded on this machine."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which dual encoder to load.

    model: an open_clip architecture name (`tiny`, `ViT-B-32`, ...), `local-dir:PATH`, or a path to
        an open_clip JSON architecture config.
    pretrained: a pretrained tag (`laion2b_s34b_b79k`), a weights file (.safetensors, or a torch file
        loaded with weights_only), or None: the committed checkpoint for `tiny`, random weights otherwise.
    device: `cpu`, `cuda` or `auto`.
    """

    model: str = EMBEDDED
    pretrained: str | None = None
    device: str = "cpu"


def register_embedded_configs() -> None:
    """Make the project's architectures (e.g. `tiny`) known to open_clip by name."""
    if EMBEDDED not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


DEVICE_FORMS = "cpu, cuda, cuda:N or auto"


def check_device(device: str) -> str:
    """The device name when it is one this project runs on (cpu, cuda, cuda:N, auto); else ValueError."""
    if re.fullmatch(r"cpu|auto|cuda(:\d+)?", device) is None:
        raise ValueError(f"unknown device {device!r}: use {DEVICE_FORMS}")
    return device


def resolve_device(device: str) -> torch.device:
    """The torch device for a name; EncoderUnavailable for an unknown name or a missing GPU."""
    try:
        check_device(device)
    except ValueError as exc:
        raise EncoderUnavailable(str(exc)) from None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderUnavailable(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _cached_tag_weights(model: str, tag: str) -> tuple[str, dict[str, Any]]:
    """Find a pretrained tag's weights in the local caches, without touching the network.

    Raises EncoderUnavailable naming the model and how to supply the weights.
    """
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise EncoderUnavailable(f"unknown pretrained tag {tag!r} for {model}; known tags: {tags}")
    candidates: list[str] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # open_clip writes hf_hub as "org/repo/" (default file name) or "org/repo/file.bin"
        repo_id, _, filename = cfg["hf_hub"].rpartition("/")
        names = [filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        for name in names:
            hit = try_to_load_from_cache(repo_id, name)
            if isinstance(hit, str):
                candidates.append(hit)
    if cfg.get("url"):
        candidates.append(os.path.expanduser(f"~/.cache/clip/{os.path.basename(cfg['url'])}"))
    for path in candidates:
        if os.path.isfile(path):
            return path, cfg
    raise EncoderUnavailable(
        f"weights for {model} / {tag} are not available offline on this machine. Either copy the Hugging "
        f"Face cache entry {cfg.get('hf_hub') or cfg.get('url')} into ~/.cache/huggingface (download it where "
        "a network is available), or pass --pretrained /path/to/weights.safetensors, or use "
        "--model local-dir:/path/to/open_clip_dir."
    )


def _architecture(config: dict[str, Any]) -> str:
    """The architecture a local-dir's config describes, by content: the open_clip architecture with the
    same model config, else its own `model_name`, else custom-<hash of the config> (never the folder's name,
    so that renaming the folder keeps the id)."""
    cfg = config.get("model_cfg", {})
    same = next((name for name in open_clip.list_models() if open_clip.get_model_config(name) == cfg), None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return same or str(config.get("model_name") or f"custom-{digest}")


def _resolve(spec: EncoderSpec) -> tuple[str, str | None, dict[str, Any], tuple[str, ...]]:
    """Turn a spec into (open_clip model name, weights file, transform kwargs, model ids).

    The first id is ARCHITECTURE@<sha256 of the weights>, however the weights are passed (a file, a
    local-dir, a cached pretrained tag); the others are the ids earlier releases gave the same model,
    still accepted for the indexes and rerankers built with them.
    """
    register_embedded_configs()
    model, pretrained = spec.model, spec.pretrained
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:"))
        if not (folder / CONFIG_NAME).is_file():
            raise EncoderUnavailable(f"{folder} has no {CONFIG_NAME}: not an open_clip local-dir checkpoint")
        weights = next(iter(sorted(folder.glob("*.safetensors"))), None)
        digest = _file_sha(weights) if weights else "random"
        config = json.loads((folder / CONFIG_NAME).read_text())
        return model, None, {}, (f"{_architecture(config)}@{digest}", f"{folder.name}@{digest}")
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise EncoderUnavailable(f"model config {model} does not exist")
        open_clip.add_model_config(Path(model))
        model = Path(model).stem
    if model not in open_clip.list_models():
        raise EncoderUnavailable(f"unknown model architecture {model!r}; known: tiny, ViT-B-32, ... (open_clip)")
    if pretrained is None and model == EMBEDDED:
        pretrained = str(EMBEDDED_DIR / WEIGHTS_NAME)
        if not Path(pretrained).is_file():
            raise EncoderUnavailable(f"embedded checkpoint {pretrained} missing; run `imsearch train encoder`")
    if pretrained is None:
        log.warning("no pretrained weights for %s: using random initialisation", model)
        return model, None, {}, (f"{model}@random",)
    if Path(pretrained).is_file():
        return model, pretrained, {}, (f"{model}@{_file_sha(Path(pretrained))}",)
    if "/" in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES:  # a file, not a tag
        raise EncoderUnavailable(f"weights file {pretrained} does not exist (for {model}); pass the path of a "
                                 ".safetensors file, or a pretrained tag open_clip knows")
    path, cfg = _cached_tag_weights(model, pretrained)
    transform = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    kwargs = {f"image_{k}": v for k, v in transform.items()}
    return model, path, kwargs, (f"{model}@{_file_sha(Path(path))}", f"{model}@{pretrained}")


class DualEncoder:
    """A CLIP-style dual encoder: images and texts into one L2-normalised space, plus patch tokens."""

    def __init__(self, model: open_clip.CLIP, preprocess: Any, tokenizer: Any, model_id: str, device: torch.device,
                 model_name: str = EMBEDDED, spec: EncoderSpec | None = None, aliases: tuple[str, ...] = ()):
        self.model = model.eval()
        self.spec = spec or EncoderSpec()  # how to load this model again (in another process: a Ray actor)
        self.model_name = model_name
        config = open_clip.get_model_config(model_name) or {}
        self.config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.aliases = aliases  # ids an earlier release gave these weights
        self.device = device
        self.embed_dim: int = int(model.text_projection.shape[1])
        visual = model.visual
        grid = visual.grid_size
        self.token_shape: tuple[int, int] = (1 + grid[0] * grid[1], int(visual.transformer.width))

    def is_model(self, model_id: str) -> bool:
        """Whether an index or reranker recorded as built with `model_id` was built with this model."""
        return model_id == self.model_id or model_id in self.aliases

    # pre: decode-side work, done in data-loader workers by the indexer
    def to_tensor(self, images: ImageBatch) -> torch.Tensor:
        """Preprocess PIL images into a (n, 3, H, W) batch; tensors pass through."""
        if isinstance(images, torch.Tensor):
            return images
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    def _autocast(self) -> Any:
        enabled = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.inference_mode()
    def encode_images_and_tokens(self, images: ImageBatch) -> tuple[np.ndarray, np.ndarray]:
        """One forward giving pooled embeddings (n, d) float32 L2-normalised and tokens (n, t, w) float32."""
        x = self.to_tensor(images).to(self.device)
        with self._autocast():
            out = self.model.forward_intermediates(
                image=x,
                image_indices=1,
                normalize_intermediates=True,  # tokens after ln_post, as the pooled path sees them
                image_output_fmt="NLC",
                image_output_extra_tokens=True,
            )
        tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        pooled = F.normalize(out["image_features"].float(), dim=-1)
        return pooled.cpu().numpy(), tokens.float().cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, images: ImageBatch) -> np.ndarray:
        """(n, d) float32, L2-normalised image embeddings."""
        x = self.to_tensor(images).to(self.device)
        with self._autocast():
            feats = self.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def image_tokens(self, images: ImageBatch) -> np.ndarray:
        """(n, t, w) float32 patch tokens ([CLS] first) from the last vision block."""
        return self.encode_images_and_tokens(images)[1]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not a single string")
        return self.tokenizer(list(texts)).to(self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32, L2-normalised text embeddings."""
        if len(texts) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        with self._autocast():
            feats = self.model.encode_text(self.tokenize(texts))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()


    @torch.inference_mode()
    def encode_texts_and_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One text forward: pooled (n, d) L2-normalised, tokens (n, L, w) after ln_final, mask (n, L).

        The mask is True up to and including the end-of-text token; CLIP's text tower is causal, so
        later positions carry nothing about the text and must never be attended to.
        """
        ids = self.tokenize(texts)
        with self._autocast():
            out = self.model.forward_intermediates(text=ids, text_indices=1, normalize_intermediates=True)
        eot = ids.argmax(dim=-1)  # open_clip pools at the EOT token, the highest id in the vocabulary
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= eot[:, None]
        pooled = F.normalize(out["text_features"].float(), dim=-1)
        return pooled.cpu().numpy(), out["text_intermediates"][0].float().cpu().numpy(), mask.cpu().numpy()


def load_encoder(spec: EncoderSpec | None = None) -> DualEncoder:
    """Load model, preprocessing and tokenizer together; never touches the network."""
    spec = spec or EncoderSpec()
    device = resolve_device(spec.device)
    name, weights, kwargs, ids = _resolve(spec)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=weights, device=device, weights_only=True, **kwargs
    )
    tokenizer = open_clip.get_tokenizer(name)
    return DualEncoder(model, preprocess, tokenizer, ids[0], device, name, spec, ids[1:])


def create_embedded(seed: int = 0) -> DualEncoder:
    """A freshly initialised `tiny` encoder (the starting point of training)."""
    register_embedded_configs()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(EMBEDDED)
    return DualEncoder(model, preprocess, open_clip.get_tokenizer(EMBEDDED), f"{EMBEDDED}@random", torch.device("cpu"))


def save_fp16(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a module's weights as fp16 safetensors, atomically: a reader (a server, a resumed run)
    never sees a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def save_checkpoint(model: torch.nn.Module, out_dir: Path, model_name: str = EMBEDDED) -> Path:
    """Write fp16 safetensors + open_clip JSON config in the `local-dir:` layout; returns the weights path."""
    weights = save_fp16(model, out_dir / WEIGHTS_NAME)
    register_embedded_configs()
    config = {"model_cfg": open_clip.get_model_config(model_name), "model_name": model_name}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return weights
