"""Reranker, backend: HF BLIP ITM (BlipForImageTextRetrieval) behind the reranker interface."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.encoder import resolve_device
from reranker.score import Located, Query


class BlipReranker:
    """BLIP's ITM head over cached vision features: the vision tower runs once per image (at index
    time, through `image_tokens`), the text encoder with cross-attention runs per query.

    Weights load from a local folder only (`save_pretrained` layout, safetensors); no hub access.
    """

    name = features = "blip"
    text_from_encoder = False
    explains = False  # ITM has no grounding head (its cross-attention maps are not trained to point)
    side = None  # its stored features are its vision tower's output, which its text encoder reads as they are

    def __init__(self, model_dir: Path | str, device: str = "cpu", fusion_weight: float = 0.0):
        try:
            from transformers import BlipForImageTextRetrieval, BlipProcessor
        except ImportError:
            raise ValueError("the blip tier needs Hugging Face transformers: pip install 'imsearch[blip]'") from None

        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a BLIP checkpoint folder (no config.json); download "
                                    "e.g. Salesforce/blip-itm-base-coco where a network is available")
        model: Any = BlipForImageTextRetrieval.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        self.device = resolve_device(device)  # auto: a GPU when there is one
        self.model = model.to(self.device).eval()
        self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        self.fusion_weight = fusion_weight
        tokenizer = self.processor.tokenizer
        enc = tokenizer.convert_tokens_to_ids("[ENC]")
        # the original BLIP replaces [CLS] with [ENC] for ITM; HF checkpoints without it keep [CLS]
        self.enc_token_id: int | None = enc if enc != tokenizer.unk_token_id else None
        vision = self.model.config.vision_config
        self.feature_shape = ((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)
        self.feature_model = f"blip-itm@{_weights_sha(folder)}"

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """(3, h, w) pixels as BLIP's processor prepares them (its resolution and normalisation)."""
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, t, w) float32 vision features of preprocessed images, to store at index time."""
        hidden = self.model.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state
        return hidden.float().cpu().numpy()

    def image_tokens(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, t, w) vision features of images."""
        return self.encode_pixels(torch.stack([self.preprocess_image(im) for im in images]))

    def prepare(self, text: str) -> Query:
        batch: Any = self.processor.tokenizer([text], return_tensors="np", padding=False, truncation=True,
                                              max_length=35)
        ids = batch["input_ids"][0].copy()
        if self.enc_token_id is not None:
            ids[0] = self.enc_token_id
        return Query(text, ids, batch["attention_mask"][0].astype(bool))

    @torch.inference_mode()
    def log_match(self, query: Query, image_tokens: np.ndarray, prepared: bool = False) -> np.ndarray:
        """(k,) log p(match) for k candidates in one batch (`prepared` never holds: it has no side)."""
        k = len(image_tokens)
        if k == 0:
            return np.zeros(0, np.float32)
        image = torch.from_numpy(np.asarray(image_tokens, dtype=np.float32)).to(self.device)
        ids = torch.from_numpy(query.tokens).long().to(self.device)[None].expand(k, -1)
        mask = torch.from_numpy(query.mask).long().to(self.device)[None].expand(k, -1)
        hidden = self.model.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=self.device),
        ).last_hidden_state
        logits = self.model.itm_head(hidden[:, 0, :])
        return torch.log_softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()


    def explain(self, query: Query, image_tokens: np.ndarray, prepared: bool = False) -> list[list[Located]]:
        raise ValueError("the blip tier cannot explain its matches: use a tier with a grounding head (mid, early)")

    def rescore(self, query: Query, image_tokens: np.ndarray, prepared: bool = False,
                explain: bool = False) -> tuple[np.ndarray, list[list[Located]] | None]:
        return self.log_match(query, image_tokens), self.explain(query, image_tokens) if explain else None


def _weights_sha(folder: Path) -> str:
    """The first 16 hex of the sha256 over the config and weights: the model's id however its folder is named."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = folder / name
        if path.is_file():
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]
