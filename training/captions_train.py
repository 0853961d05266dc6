"""Training floor, reranker train on your own captions: ITM over an index's stored tokens and captions,
with hard negatives mined by the dual encoder (BLIP's recipe), for any open_clip encoder.

The index is the data: its tokens are what the reranker will score when served (in the index's token
format), and its vectors find each caption's hard negatives, the images the dual encoder ranks next
to the right one. A tenth of the captioned images is held out to fit p(match)'s calibration and the
fusion weight on retrieval from the whole index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from indexer.encoder import DualEncoder
from indexer.store import Index
from reranker.score import Query, TokenReranker, fuse
from training.freeform import best_calibration, calibration_error, raw_margins
from training.reranker_train import PairBatch, RerankTrainConfig

MIN_CAPTIONED = 20  # fewer captioned images teach nothing and leave no held-out set
VAL_SHARE = 0.1
POOL = 32  # the dual encoder's top candidates that a caption's hard negatives are drawn from
MINED = 4  # image negatives per caption
VAL_QUERIES = 500
FUSION_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 50.0)


@dataclass
class CaptionData:
    """An index's captioned images, split into training and held-out ids."""

    index: Index
    train: np.ndarray  # ids
    val: np.ndarray
    captions: dict[int, str]  # id → caption
    vectors: np.ndarray  # (len(train), d) pooled embeddings of the training ids
    groups: dict[str, int] = field(init=False)  # caption → its number (images sharing it share it)
    train_groups: np.ndarray = field(init=False)  # of the training ids: compared on every step, computed once

    def __post_init__(self) -> None:
        self.groups = {text: g for g, text in enumerate(sorted(set(self.captions.values())))}
        self.train_groups = self.group_of(self.train)

    def group_of(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.groups[self.captions[int(i)]] for i in ids], dtype=np.int64)

    def same_caption(self, texts: list[str], ids: np.ndarray) -> np.ndarray:
        """(len(texts), len(ids)) whether each id's caption is the text: such an image is no negative."""
        wanted = np.array([self.groups.get(t, -1) for t in texts], dtype=np.int64)
        groups = self.train_groups if ids is self.train else self.group_of(ids)
        return wanted[:, None] == groups[None, :]


def load_captions(index: Index, seed: int = 0) -> CaptionData:
    """The index's captioned images, a deterministic tenth of them held out; ValueError when too few."""
    ids = index.ids()
    rows = index.metadata(ids, ["caption"]) if len(ids) else []
    captions = {int(i): " ".join(r["caption"].lower().split()) for i, r in zip(ids, rows, strict=True)
                if r["caption"] and r["caption"].strip()}  # compared as the tokenizer sees them (lower case)
    if len(captions) < MIN_CAPTIONED:
        raise ValueError(f"index {index.root} holds {len(captions)} captioned images; training a reranker needs "
                         f"at least {MIN_CAPTIONED} (give the images a caption column: .jsonl or .parquet)")
    order = np.random.default_rng(seed).permutation(np.array(sorted(captions), dtype=np.int64))
    held = max(1, int(len(order) * VAL_SHARE))
    train = np.sort(order[held:])
    return CaptionData(index, train, np.sort(order[:held]), captions, index.vectors(train))


def caption_pairs(encoder: DualEncoder, data: CaptionData, cfg: RerankTrainConfig, step: int) -> PairBatch:
    """Per caption: its image, MINED images the dual encoder ranks near it (sampled by similarity among
    its top POOL, none with the same caption), and its image against another caption of the batch,
    the one whose text the image is most similar to."""
    rng = np.random.default_rng([cfg.seed, 79, step])
    n, b = len(data.train), cfg.batch
    picked = rng.choice(n, size=b, replace=n < b)  # positions in train
    ids = data.train[picked]
    texts = [data.captions[int(i)] for i in ids]
    emb, tokens, mask = encoder.encode_texts_and_tokens(texts)
    sim = np.where(data.same_caption(texts, data.train), -np.inf, emb @ data.vectors.T)
    mined = np.stack([draw_negatives(row, rng, cfg.mined_temperature) for row in sim])  # (b, MINED) positions in train
    image_sim = np.where(data.same_caption(texts, ids).T, -np.inf, data.vectors[picked] @ emb.T)
    other = image_sim.argmax(axis=1)  # per image, the batch's most similar caption that is not its own
    pos = np.arange(b)
    image_ids = np.concatenate([ids, data.train[mined.reshape(-1)], ids])
    text_rows = np.concatenate([pos, np.repeat(pos, mined.shape[1]), other])
    labels = np.zeros(len(image_ids), np.int64)
    labels[:b] = 1
    negative_texts = np.isfinite(image_sim[pos, other])  # a batch of one caption has no other text
    keep = np.concatenate([np.ones(b * (1 + mined.shape[1]), bool), negative_texts])
    image = torch.from_numpy(np.asarray(data.index.tokens(image_ids[keep]), dtype=np.float32))
    return PairBatch(image, torch.from_numpy(tokens[text_rows[keep]]), torch.from_numpy(mask[text_rows[keep]]),
                     torch.from_numpy(labels[keep]))


def draw_negatives(sim: np.ndarray, rng: np.random.Generator, temperature: float) -> np.ndarray:
    """MINED positions among the POOL most similar, sampled by softmax(similarity / T) without repeats."""
    top = np.argsort(-sim)[:POOL]
    top = top[np.isfinite(sim[top])]
    if len(top) == 0:
        raise ValueError("every training image has the same caption: there is no negative to learn from")
    logits = sim[top] / temperature
    p = np.exp(logits - logits.max())
    return rng.choice(top, size=MINED, replace=len(top) < MINED, p=p / p.sum())


def fit_on_captions(reranker: TokenReranker, data: CaptionData, k: int = 16) -> dict[str, float]:
    """Calibrate p(match) (temperature, bias) on the held-out captions' top-k from the whole index (an
    image with the caption is a match), then the fusion weight maximising their R@1; returns the fit."""
    encoder, cfg = reranker.encoder, reranker.matcher.cfg
    scored, queries = [], []
    for image_id in data.val[:VAL_QUERIES]:
        text = data.captions[int(image_id)]
        pooled, tokens, mask = encoder.encode_texts_and_tokens([text])
        cosine, ids = data.index.search(pooled, k)
        keep = ids[0] >= 0
        cosine, ids = cosine[0][keep], ids[0][keep]
        log_p = reranker.log_match(Query(text, tokens[0], mask[0]), data.index.tokens(ids))
        true = data.same_caption([text], ids)[0]
        scored += list(zip(log_p.tolist(), true.tolist(), strict=True))
        queries.append((len(log_p), cosine, true))
    margins, truth = raw_margins(scored, cfg)
    cfg.temperature, cfg.bias = best_calibration(margins, truth)
    calibrated = torch.nn.functional.logsigmoid(torch.from_numpy(margins / cfg.temperature + cfg.bias)).numpy()
    split = np.cumsum([size for size, _, _ in queries])[:-1]
    per_query = list(zip(np.split(calibrated, split), queries, strict=True))

    def r1(weight: float) -> float:
        return float(np.mean([true[np.argmax(fuse(lp, cos, weight))] for lp, (_, cos, true) in per_query if len(lp)]))

    weight = max(FUSION_GRID, key=r1)
    cfg.fusion_weight = reranker.fusion_weight = weight
    error = calibration_error(list(zip(calibrated.tolist(), truth.tolist(), strict=True)))
    return {"temperature": cfg.temperature, "bias": cfg.bias, "val_calibration_error": error,
            "fusion_weight": weight, "val_r1_at_16": r1(weight), "val_queries": len(per_query),
            "train_images": len(data.train)}
