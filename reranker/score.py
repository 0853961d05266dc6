"""Reranker, interface: one interface to rescore top-k candidates from their cached image tokens."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError

from indexer.encoder import MODELS_DIR, DualEncoder
from indexer.features import ENCODER_TOKENS
from reranker.model import Matcher, load_reranker

SIDE_WEIGHTS = ("image_in.", "image_pos", "image_xy.", "image_mix.")  # Matcher.embed_image's parameters
TIERS = ("mid", "early")  # the tiers that score the dual encoder's tokens (their features: ENCODER_TOKENS)
KINDS = (*TIERS, "blip")  # every tier a service may load: blip scores BLIP's own vision features


@dataclass
class Query:
    """What a reranker needs from the query, computed once: text tokens (L, w) and their mask (L,)."""

    text: str
    tokens: np.ndarray
    mask: np.ndarray


@dataclass
class Located:
    """Where a reranker found an object the query names: its phrase ("large red circle") and its centre
    (x, y) as fractions of the image's width and height from the top left."""

    phrase: str
    x: float
    y: float


class Reranker(Protocol):
    """Rescores k candidates of one query; higher is a better match."""

    name: str
    fusion_weight: float
    features: str  # the index's feature set it scores: ENCODER_TOKENS, or its own (stored by --tiers at index time)
    feature_model: str  # the model that computed them: features from other weights are refused, never scored
    feature_shape: tuple[int, int]  # (tokens, width) of one image's features
    text_from_encoder: bool  # its Query is the dual encoder's text tokens (the search computed them already)
    explains: bool  # whether `explain` can say where the named objects are (a grounding head)
    side: ImageSide | None  # its image side, which an index may store to be scored with prepared=True

    def prepare(self, text: str) -> Query: ...

    def log_match(self, query: Query, image_tokens: np.ndarray, prepared: bool = False) -> np.ndarray: ...

    def explain(self, query: Query, image_tokens: np.ndarray, prepared: bool = False) -> list[list[Located]]: ...

    def rescore(self, query: Query, image_tokens: np.ndarray, prepared: bool = False,
                explain: bool = False) -> tuple[np.ndarray, list[list[Located]] | None]:
        """log_match and, with `explain`, explain, in one call (a tier may share their work)."""
        ...


class ImageSide:
    """A mid tier's image side (Matcher.embed_image: the dual encoder's tokens through its input projection,
    positions and patch-mixing block) as index-time features: what a rerank computes per candidate and per
    query although it depends on the image alone. An index that stores it skips that third of the cost.

    Its model id hashes the weights that compute it and the encoder whose tokens they read: a side stored
    by other weights is never scored (the tier scores the raw tokens instead)."""

    def __init__(self, matcher: Matcher):
        self.matcher = matcher.eval()
        self.features = matcher.cfg.kind
        self.encoder_id = matcher.cfg.encoder_id
        self.feature_shape = (matcher.cfg.image_tokens, matcher.cfg.width)
        digest = hashlib.sha256(self.encoder_id.encode())
        for name, tensor in sorted(matcher.state_dict().items()):
            if name.startswith(SIDE_WEIGHTS):
                digest.update(name.encode())
                digest.update(tensor.detach().half().cpu().numpy().tobytes())  # as stored: fp16
        self.feature_model = f"{self.features}-side@{digest.hexdigest()[:16]}"

    @torch.inference_mode()
    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(n, t, width) float32 image side of n images' dual-encoder tokens (n, t, token width)."""
        image = torch.from_numpy(np.asarray(tokens, dtype=np.float32))
        return self.matcher.embed_image(image).numpy()


class TokenReranker:
    """A mid or early fusion Matcher over the dual encoder's text and cached patch tokens."""

    def __init__(self, matcher: Matcher, encoder: DualEncoder):
        if matcher.cfg.encoder_id and not encoder.is_model(matcher.cfg.encoder_id):
            raise ValueError(f"reranker was trained on tokens of {matcher.cfg.encoder_id}, "
                             f"but the encoder is {encoder.model_id}")
        self.matcher = matcher.eval()
        self.encoder = encoder
        self.name = matcher.cfg.kind
        self.fusion_weight = matcher.cfg.fusion_weight
        self.features, self.feature_model, self.text_from_encoder = ENCODER_TOKENS, encoder.model_id, True
        self.feature_shape = encoder.token_shape
        cfg = matcher.cfg
        self.explains = cfg.ground and bool(cfg.nouns)
        self.side = self.side_of(matcher)
        spelled = word_tokens(encoder, cfg.nouns + cfg.modifiers) if self.explains else {}
        # the head reads one noun token: a noun the tokenizer splits cannot be located
        self._nouns = {ids[0]: w for w, ids in spelled.items() if w in cfg.nouns and len(ids) == 1}
        self._modifiers = [(ids, w) for w, ids in spelled.items() if w in cfg.modifiers and ids]

    @staticmethod
    def side_of(matcher: Matcher) -> ImageSide | None:
        # mid's image side is a third of its cost at k = 16; early's a tenth of a cost its stream dominates
        return ImageSide(matcher) if matcher.cfg.kind == "mid" else None

    def prepare(self, text: str) -> Query:
        _, tokens, mask = self.encoder.encode_texts_and_tokens([text])
        return Query(text, tokens[0], mask[0])

    def log_match(self, query: Query, image_tokens: np.ndarray, prepared: bool = False) -> np.ndarray:
        """(k,) log p(match) for k candidates, all in one batch.

        Args:
            query: from prepare (or built from the tokens the search already computed).
            image_tokens: (k, t, w) float16/float32 tokens from the index's token store, or with `prepared`
                their image side as the index stored it (self.side).
        """
        return self.rescore(query, image_tokens, prepared)[0]

    @torch.inference_mode()
    def rescore(self, query: Query, image_tokens: np.ndarray, prepared: bool = False,
                explain: bool = False) -> tuple[np.ndarray, list[list[Located]] | None]:
        """log_match's (k,) and, with `explain`, explain's answer, from one pass: the grounding states are the
        score's own after the grounding layer."""
        k = len(image_tokens)
        if k == 0:
            return np.zeros(0, np.float32), [] if explain else None
        ids, where = self._nouns_at(query) if explain else ([], [])
        logits, states = self.matcher.score_and_ground(*_tensors(query, image_tokens), prepared, ground=bool(where))
        log_p = Matcher.log_match(logits, self.matcher.cfg.temperature, self.matcher.cfg.bias).numpy()
        if not explain:
            return log_p, None
        return log_p, self._located(ids, where, states) if states is not None else [[] for _ in range(k)]

    @torch.inference_mode()
    def explain(self, query: Query, image_tokens: np.ndarray, prepared: bool = False) -> list[list[Located]]:
        """Per candidate, where each noun of the query is: the grounding head read off that noun's state
        after the block it was trained at (the blocks after it do not run). Nouns outside the head's
        vocabulary are not located; a plural ("shapes") is none of its words."""
        ids, where = self._nouns_at(query)
        if not where or not len(image_tokens):
            return [[] for _ in range(len(image_tokens))]
        return self._located(ids, where, self.matcher.ground_states(*_tensors(query, image_tokens), prepared))

    def _nouns_at(self, query: Query) -> tuple[list[int], list[int]]:
        """The query's token ids and the positions of the nouns the grounding head locates."""
        ids = self.encoder.tokenize([query.text])[0].tolist()
        return ids, [p for p, t in enumerate(ids) if t in self._nouns and query.mask[p]]

    def _located(self, ids: list[int], where: list[int], states: torch.Tensor) -> list[list[Located]]:
        """Per candidate, each noun's phrase and (x, y) in [0, 1], read by the grounding head off its state."""
        xy = ((self.matcher.locate(states[:, [1 + p for p in where]]).clamp(-1, 1) + 1) / 2).numpy()  # 1: [ENC]
        phrases = [self._phrase(ids, p) for p in where]
        return [[Located(ph, round(float(x), 4), round(float(y), 4)) for ph, (x, y) in zip(phrases, row, strict=True)]
                for row in xy]

    def _phrase(self, ids: list[int], at: int) -> str:
        """The noun at `at` with the modifiers written right before it: "large red circle"."""
        words, start = [self._nouns[ids[at]]], at
        while True:
            before = next(((seq, w) for seq, w in self._modifiers
                           if tuple(ids[max(0, start - len(seq)) : start]) == seq), None)
            if before is None:
                return " ".join(words)
            words.insert(0, before[1])
            start -= len(before[0])


def _tensors(query: Query, image_tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Matcher's one-text inputs: (k, t, w) float32 image features, (1, L, text width) text tokens, (1, L) mask."""
    image = torch.from_numpy(np.asarray(image_tokens, dtype=np.float32))
    return image, torch.from_numpy(query.tokens).float()[None], torch.from_numpy(query.mask)[None]


def word_tokens(encoder: DualEncoder, words: list[str]) -> dict[str, tuple[int, ...]]:
    """Each word's token ids as a query spells it (start and end of text left out)."""
    eot = int(encoder.tokenize([""])[0, 1])
    rows = [row.tolist() for row in encoder.tokenize(words)]
    return {w: tuple(row[1 : row.index(eot)]) for w, row in zip(words, rows, strict=True)}


def fuse(log_match: np.ndarray, cosine: np.ndarray, weight: float) -> np.ndarray:
    """Final score: ITM log-probability plus the weighted dual-encoder cosine."""
    return log_match + weight * cosine


def feature_source(reranker: Reranker) -> Any:
    """What an index stores for this tier, if anything: its own vision tower's features (blip), its image side
    (mid), or None (early scores the dual encoder's tokens, which every index holds)."""
    return reranker.side if reranker.side is not None else (None if reranker.features == ENCODER_TOKENS else reranker)


def rerank_order(reranker: Reranker, query: Query, image_tokens: np.ndarray, cosine: np.ndarray,
                 prepared: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescore k candidates (with `prepared`, their stored image side): (order best first, log p(match), fused
    score), all (k,)."""
    log_p = reranker.log_match(query, image_tokens, prepared)
    fused = fuse(log_p, cosine, reranker.fusion_weight)
    return np.argsort(-fused, kind="stable"), log_p, fused


def tier_entry(entry: str) -> tuple[str, Path | None]:
    """An IMSEARCH_RERANKERS (or --tiers) entry, TIER or TIER=CHECKPOINT, as (tier, checkpoint or None)."""
    tier, _, path = entry.strip().partition("=")
    return tier, Path(path) if path else None


def load_kind(kind: str, encoder: DualEncoder, path: Path | None = None, device: str = "cpu") -> Reranker:
    """A tier of any kind: mid or early (load_tier), or HF BLIP ITM from its model folder."""
    return load_tier(kind, encoder, path) if kind != "blip" else load_blip(path, device)


def load_blip(path: Path | None, device: str = "cpu") -> Any:
    """The blip tier (a BlipReranker: the reranker and, at index time, its vision tower) from its folder."""
    from reranker.blip import BlipReranker

    if path is None:
        raise ValueError("the blip tier needs its model folder: blip=/models/blip-itm-base-coco")
    return BlipReranker(path, device)


def load_tier(kind: str, encoder: DualEncoder, path: Path | None = None) -> TokenReranker:
    """The committed reranker of a tier (or a given checkpoint of that kind) bound to its encoder."""
    return TokenReranker(_matcher(kind, path), encoder)


def load_side(kind: str, path: Path | None = None) -> ImageSide | None:
    """The image side of a tier (or of a given checkpoint of that kind) that has one worth storing: mid."""
    return TokenReranker.side_of(_matcher(kind, path))


def _matcher(kind: str, path: Path | None) -> Matcher:
    if kind not in TIERS:
        raise ValueError(f"unknown rerank tier {kind!r}: use one of {', '.join(KINDS)}")
    try:
        matcher = load_reranker(path or MODELS_DIR / f"reranker-{kind}.safetensors")
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a reranker checkpoint (safetensors): {exc}") from None
    if matcher.cfg.kind != kind:
        raise ValueError(f"{path} is a {matcher.cfg.kind} reranker, not {kind}")
    return matcher
