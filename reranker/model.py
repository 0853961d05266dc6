"""Reranker, models: mid fusion (ITM cross-attention) and early fusion (single stream) matchers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from indexer.encoder import save_fp16


@dataclass
class RerankerConfig:
    """Architecture and fitted score fusion; stored as safetensors metadata next to the weights."""

    kind: str = "mid"  # mid | early
    width: int = 192
    layers: int = 3
    heads: int = 4
    text_width: int = 128  # the dual encoder's text token width
    image_width: int = 192  # the dual encoder's patch token width
    image_tokens: int = 65  # [CLS] + patches
    max_text: int = 32
    coords: bool = False  # explicit linear (x, y) of each patch, see Matcher.image_xy (new checkpoints: True)
    ground: bool = False  # a head that reads an object's (x, y) off its word's state, trained as an auxiliary
    ground_layer: int = 0  # the block whose output the grounding head reads (later blocks compare places)
    image_mix: int = 0  # hidden width of the image-side block (3x3 patch neighbourhood + MLP); 0: none
    fusion_weight: float = 10.0  # final = log p(match) + fusion_weight * cosine, fitted on validation
    temperature: float = 1.0  # p(match) = sigmoid(logit margin / temperature + bias): Platt scaling,
    bias: float = 0.0  # fitted on validation descriptions (the head's raw margin is over-confident near 0)
    encoder_id: str = ""  # the dual encoder whose tokens this reranker reads
    nouns: list[str] = field(default_factory=list)  # the words the grounding head was trained to locate
    modifiers: list[str] = field(default_factory=list)  # words that narrow a noun ("large", "red"): its phrase

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def grid_coordinates(tokens: int) -> torch.Tensor:
    """(tokens, 2) patch centre (x, y) in [-1, 1], row-major after [CLS] (which sits at 0, 0)."""
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        return torch.zeros(tokens, 2)
    axis = (torch.arange(side).float() + 0.5) / side * 2 - 1
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.cat([torch.zeros(1, 2), torch.stack([cols.flatten(), rows.flatten()], dim=1)])


def grid_position_embedding(tokens: int, width: int) -> torch.Tensor:
    """(1, tokens, width) sin/cos of each patch's column (first half) and row (second half); [CLS] gets 0."""
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1 or width % 4:
        return torch.randn(1, tokens, width) * 0.02
    freqs = 1.0 / (100.0 ** (torch.arange(width // 4) / (width // 4)))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.flatten()[:, None].float() * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    grid = torch.cat([encode(cols), encode(rows)], dim=1)  # (side*side, width)
    return torch.cat([torch.zeros(1, width), grid])[None]


class ImageMix(nn.Module):
    """A residual block over image tokens: each patch mixes its 3x3 neighbourhood, then a per-token MLP.

    A shape at 64 px spans two to four patches, and cross-attention alone only takes weighted
    averages of linear projections of single tokens: a linear probe reads an object's shape off the
    last ViT block's tokens at 0.45 accuracy, an MLP over its 3x3 neighbourhood at 0.81. The output
    projection starts at zero, so a checkpoint trained without this block continues unchanged.
    """

    def __init__(self, width: int, hidden: int, tokens: int):
        super().__init__()
        self.side = int(round((tokens - 1) ** 0.5))
        if self.side * self.side != tokens - 1:
            raise ValueError(f"image_mix needs a square patch grid after [CLS]; got {tokens} tokens")
        self.ln = nn.LayerNorm(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, groups=width)  # per channel: cheap
        self.up, self.act, self.down = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n, t, w = image.shape
        h = self.ln(image)
        grid = h[:, 1:].transpose(1, 2).reshape(n, w, self.side, self.side)
        mixed = self.conv(grid).reshape(n, w, t - 1).transpose(1, 2)
        h = torch.cat([h[:, :1], h[:, 1:] + mixed], dim=1)  # [CLS] has no neighbourhood
        return image + self.down(self.act(self.up(h)))


class CrossBlock(nn.Module):
    """Text self-attention, cross-attention to image tokens, feed-forward; pre-norm residuals."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, text: torch.Tensor, pad: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.attend(self.self_part(text, pad), image)

    def self_part(self, text: torch.Tensor, pad: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Text self-attention; with `rows`, only the first `rows` positions are computed as queries."""
        h = self.ln1(text)
        q = h if rows is None else h[:, :rows]
        return text[:, : q.shape[1]] + self.self_attn(q, h, h, key_padding_mask=pad, need_weights=False)[0]

    def attend(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Cross-attention to the image tokens, then the feed-forward."""
        h = self.ln2(text)
        text = text + self.cross_attn(h, image, image, need_weights=False)[0]
        return text + self.mlp(self.ln3(text))

    def attend_folded(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """`attend` with the image-side projections folded into the text rows: q·(W_k y + b_k) =
        (W_kᵀ q)·y + a term that softmax drops, and Σ a_j (W_v y_j + b_v) = W_v (Σ a_j y_j) + b_v.
        The keys and values of every image token (2·t·w² multiply-adds per pair) become about
        2·h·L·t·w + 2·L·w² for the L text rows: fewer whenever L is well under t (a query of 12 tokens
        against 65 image tokens).

        Args:
            text: (k, L, w), or (1, L, w) rows every candidate shares (projected once); image: (k, t, w) embedded
                image tokens.
        """
        attn = self.cross_attn
        (n, rows, w), heads, k = text.shape, attn.num_heads, image.shape[0]
        d = w // heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, _, b_v = attn.in_proj_bias.chunk(3)
        q = (F.linear(self.ln2(text), w_q, b_q) * d**-0.5).view(n, rows, heads, d)
        q_img = torch.einsum("klhd,hdw->khlw", q, w_k.view(heads, d, w))  # the queries in image space
        weights = torch.softmax(q_img.reshape(n, heads * rows, w) @ image.transpose(1, 2), dim=-1)
        mixed = (weights @ image).view(k, heads, rows, w)  # each head's weighted average of image tokens
        values = torch.einsum("khlw,hdw->klhd", mixed, w_v.view(heads, d, w)).reshape(k, rows, w) + b_v
        text = text + attn.out_proj(values)
        return text + self.mlp(self.ln3(text))


class Matcher(nn.Module):
    """Scores (image tokens, text tokens) pairs: a logit per pair, log p(match) = logsigmoid-like 2-way."""

    xy: torch.Tensor  # (tokens, 2) patch coordinates, a buffer when cfg.coords

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.text_in = nn.Linear(cfg.text_width, w)
        self.image_in = nn.Linear(cfg.image_width, w)
        # learned, but starting from explicit 2-D (x, y) features: relations ("left of", "above")
        # compare positions, which the last ViT block's tokens carry only weakly
        self.image_pos = nn.Parameter(grid_position_embedding(cfg.image_tokens, w))
        self.image_mix = ImageMix(w, cfg.image_mix, cfg.image_tokens) if cfg.image_mix else None
        if cfg.coords:
            # plus coordinates as a linear direction: an attention-weighted average of patch values then
            # holds the attended object's centroid, and "left of" becomes a difference of two numbers
            self.register_buffer("xy", grid_coordinates(cfg.image_tokens), persistent=False)
            self.image_xy = nn.Linear(2, w, bias=False)
        self.enc = nn.Parameter(torch.zeros(1, 1, w))  # the [ENC] token whose output feeds the head
        nn.init.normal_(self.enc, std=0.02)
        self.ln_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, 2)  # (no match, match)
        if cfg.ground:
            self.locate = nn.Linear(w, 2)  # a named object's (x, y), from its shape word's state
            self.relate = nn.Linear(w, 2)  # from [ENC]: first-named object's (x, y) minus the second's
        if cfg.kind == "mid":
            self.blocks = nn.ModuleList([CrossBlock(w, cfg.heads) for _ in range(cfg.layers)])
        elif cfg.kind == "early":
            self.type_emb = nn.Parameter(torch.zeros(2, w))  # image, text
            layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.stream = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown reranker kind {cfg.kind!r}: use mid or early")

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(n, 2) logits.

        Args:
            image: (n, t, image_width) patch tokens.
            text: (n, L, text_width) text tokens.
            mask: (n, L) bool, True for real text tokens (padding is never attended).
        """
        return self.encode(image, text, mask)[0]

    def encode(self, image: torch.Tensor, text: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, 2) logits, (n, 1 + L', w) states of [ENC] + text after block `ground_layer`, (n, w) final [ENC].

        The middle states feed the grounding head in training: a word that names an object should
        know where that object is early, so that the later blocks can compare two such places; the
        final [ENC] state feeds the relation head, which asks it to hold that comparison.
        """
        img = self.embed_image(image)
        txt, pad = self.embed_text(text, mask)
        hidden = txt
        if self.cfg.kind == "mid":
            for i, block in enumerate(self.blocks):
                txt = block(txt, pad, img)
                hidden = txt if i == self.cfg.ground_layer else hidden
            out = txt[:, 0]
        else:
            seq, full_pad = self._stream(txt, pad, img)
            for i, layer in enumerate(self.stream.layers):
                seq = layer(seq, src_key_padding_mask=full_pad)
                hidden = seq[:, : txt.shape[1]] if i == self.cfg.ground_layer else hidden
            out = seq[:, 0]
        return self.head(self.ln_out(out)), hidden, out

    def ground_states(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                      prepared: bool = False) -> torch.Tensor:
        """(k, 1 + L', w) [ENC] + text states of one text against k images after block `ground_layer`, what
        `locate` reads: encode's `hidden`, without the blocks after it, computed as score_one_text computes them.
        With `prepared`, `image` is already embed_image's output (an index's stored image side).

        Args:
            image: (k, t, image_width), or with `prepared` (k, t, width); text: (1, L, text_width); mask: (1, L).
        """
        k = image.shape[0]
        img = image if prepared else self.embed_image(image)
        if self.cfg.kind == "mid":
            return self._folded_blocks(*self.embed_text(text, mask), img, self.cfg.ground_layer + 1)[0]
        txt, pad = self.embed_text(text.expand(k, -1, -1), mask.expand(k, -1))
        seq, full_pad = self._stream(txt, pad, img)
        for layer in list(self.stream.layers)[: self.cfg.ground_layer + 1]:
            seq = layer(seq, src_key_padding_mask=full_pad)
        return seq[:, : txt.shape[1]]

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """(n, t, width) the image side: what the text attends to, a function of the image alone (for mid,
        a third of a rerank's cost at k = 16), so an index may store it (reranker.score.ImageSide)."""
        img = self.image_in(image) + self.image_pos[:, : image.shape[1]]
        if self.cfg.coords:
            img = img + self.image_xy(self.xy[: image.shape[1]])
        return img if self.image_mix is None else self.image_mix(img)

    def embed_text(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[ENC] + projected text tokens, and the padding mask (True = never attended)."""
        # trailing padding is never attended, so dropping it changes nothing but the cost
        length = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
        text, mask = text[:, :length], mask[:, :length]
        txt = torch.cat([self.enc.expand(text.shape[0], -1, -1), self.text_in(text)], dim=1)
        pad = torch.cat([torch.zeros(text.shape[0], 1, dtype=torch.bool, device=mask.device), ~mask], dim=1)
        return txt, pad

    def score_one_text(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                       prepared: bool = False) -> torch.Tensor:
        """(k, 2) logits of one text against k images: forward's result, computed without repeats.

        Early fusion computes its last layer at [ENC] only (_early_at_enc). Mid: the first block's
        text self-attention sees no image, so it and that block's cross-attention queries run once
        instead of k times; the last block's outputs matter only at [ENC], so only that row is computed
        there (its keys and values still come from every text token); no cross-attention projects the
        image tokens (CrossBlock.attend_folded).

        Args:
            image: (k, t, image_width), or with `prepared` embed_image's (k, t, width); text: (1, L, text_width);
                mask: (1, L).
        """
        return self.score_and_ground(image, text, mask, prepared, ground=False)[0]

    def score_and_ground(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, prepared: bool = False,
                         ground: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """score_one_text's logits and, with `ground`, ground_states' states, in one pass where the grounding
        layer is not mid's last (its blocks up to that layer are the score's own)."""
        k = image.shape[0]
        if self.cfg.kind != "mid":
            logits, states = self._early_at_enc(image, text.expand(k, -1, -1), mask.expand(k, -1), prepared)
            if ground and states is None:  # grounded at the last layer, which runs at [ENC] only
                states = self.ground_states(image, text, mask, prepared)
            return logits, states if ground else None
        img = image if prepared else self.embed_image(image)
        txt, states = self._folded_blocks(*self.embed_text(text, mask), img, len(self.blocks), enc_last=True)
        if ground and states is None:
            states = self.ground_states(img, text, mask, prepared=True)
        return self.head(self.ln_out(txt[:, 0])), states if ground else None

    def _folded_blocks(self, txt: torch.Tensor, pad: torch.Tensor, img: torch.Tensor, blocks: int,
                       enc_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k, rows, w) states after the first `blocks` mid blocks of one text's (1, L, w) rows against k embedded
        images: the first block's self-attention runs once (it sees no image; attend_folded broadcasts its rows);
        with `enc_last`, the last block's outputs at [ENC] only. Also the states after block `ground_layer` where
        it ran for every row (else None)."""
        chain = cast(list[CrossBlock], list(self.blocks))[:blocks]
        last = len(chain) - 1 if enc_last else -1
        txt, grounded = chain[0].self_part(txt, pad, rows=1 if last == 0 else None), None
        pad = pad.expand(img.shape[0], -1)
        for i, block in enumerate(chain):
            if i > 0:
                txt = block.self_part(txt, pad, rows=1 if i == last else None)
            txt = block.attend_folded(txt, img)
            grounded = txt if i == self.cfg.ground_layer and i != last else grounded
        return txt, grounded

    def _stream(self, txt: torch.Tensor, pad: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Early fusion's input: [text; image] with type embeddings, and its padding mask (image: none)."""
        seq = torch.cat([txt + self.type_emb[1], img + self.type_emb[0]], dim=1)
        no_pad = torch.zeros(img.shape[0], img.shape[1], dtype=torch.bool, device=pad.device)
        return seq, torch.cat([pad, no_pad], dim=1)

    def _early_at_enc(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                      prepared: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Early fusion's logits, its last layer computed at [ENC] only: the head reads nothing else,
        so that layer's attention output and feed-forward run for one row instead of every token
        (its keys and values still come from all of them). Also ground_states' states, where the
        grounding layer is not the last (else None)."""
        txt, pad = self.embed_text(text, mask)
        seq, full_pad = self._stream(txt, pad, image if prepared else self.embed_image(image))
        layers = cast(list[nn.TransformerEncoderLayer], list(self.stream.layers))
        states = None
        for i, layer in enumerate(layers[:-1]):
            seq = layer(seq, src_key_padding_mask=full_pad)
            states = seq[:, : txt.shape[1]] if i == self.cfg.ground_layer else states
        last = layers[-1]  # norm_first: x + attention(norm1(x)), then + feed-forward(norm2(x))
        h = last.norm1(seq)
        row = seq[:, :1] + last.self_attn(h[:, :1], h, h, key_padding_mask=full_pad, need_weights=False)[0]
        row = row + last.linear2(last.activation(last.linear1(last.norm2(row))))
        return self.head(self.ln_out(row[:, 0])), states

    @staticmethod
    def log_match(logits: torch.Tensor, temperature: float = 1.0, bias: float = 0.0) -> torch.Tensor:
        """(n,) log p(match), calibrated by a temperature and bias on the 2-way logits' margin (the
        defaults leave log_softmax's answer)."""
        margin = (logits[:, 1] - logits[:, 0]).float()
        return torch.nn.functional.logsigmoid(margin / temperature + bias)


def save_reranker(model: Matcher, path: Path) -> Path:
    """fp16 safetensors with the config (and fitted fusion weight) in the file's metadata."""
    return save_fp16(model, path, {"config": model.cfg.to_json()})


def load_reranker(path: Path, device: str | torch.device = "cpu") -> Matcher:
    """Load a checkpoint written by save_reranker (safetensors only: no pickle)."""
    if not path.is_file():
        raise FileNotFoundError(f"reranker checkpoint {path} not found; run `imsearch train reranker`")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k).float() for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if "config" not in meta:
        raise ValueError(f"{path} has no reranker config in its metadata")
    model = Matcher(RerankerConfig(**json.loads(meta["config"])))
    model.load_state_dict(state)
    return model.to(device).eval()
