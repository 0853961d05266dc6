"""Training floor, reranker train: ITM training over the frozen dual encoder's tokens, with hard negatives."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from indexer.encoder import MODELS_DIR, DualEncoder
from reranker.model import Matcher, RerankerConfig, load_reranker, save_reranker
from training.descriptions import (
    KINDS,
    Description,
    Written,
    allowed,
    caption_claim,
    describe,
    grounding,
    holds,
    mention_order,
    pick,
)
from training.encoder_train import lr_at, resume_log, save_log
from training.scenes import (
    COLOURS,
    PLACE_FIELDS,
    SHAPES,
    SIZES,
    TRAIN_SEED,
    Scene,
    SceneObject,
    caption,
    change_shape,
    object_position,
    perturb,
    render,
    scene_pair,
    swap_fields,
    transpose,
    twin,
)


@dataclass
class RerankTrainConfig:
    """Reranker training settings; defaults produced the committed checkpoints."""

    kind: str = "mid"
    steps: int = 1500
    batch: int = 32  # positives per step; each brings `negatives` negatives
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.05
    seed: int = TRAIN_SEED
    layers: int | None = None  # default 3; a warm start keeps its init's, or cuts it to its first `layers` blocks
    width: int = 192
    out: Path | None = None  # default models/reranker-<kind>.safetensors
    mined_temperature: float = 0.05  # ITC-mined negatives are sampled by softmax(similarity / T)
    ground_weight: float = 1.0  # auxiliary loss: each named object's (x, y) read off its shape word
    image_negatives: bool = True  # each positive's caption against a perturbed image (off: 4 negatives each)
    shape_negatives: bool = False  # and against its image with one object's shape changed (a 6th negative)
    layout_negatives: bool = False  # and against its image transposed, a row made a column (a 7th negative)
    init: Path | None = None  # warm start: continue from this checkpoint instead of random weights
    teacher: Path | None = None  # distil: a reranker of the same kind whose p(match) of each pair is a soft target
    distill_weight: float = 1.0  # of the teacher's term in the loss
    first_step: int = 0  # data stream offset, so a continued run sees scenes the first run did not
    image_mix: int = 0  # hidden width of the image-side neighbourhood block (0: none); may be added on a warm start
    describe_share: float = 0.0  # share of positives described as people write them (training.descriptions)
    hard_share: float = 0.0  # of described positives: two of three objects, a count or sizes left out (see _kind)
    save_every: int = 100  # steps between resumable saves of the weights and the run's log
    rewarm: int = 50  # on a resume the optimizer restarts: its learning rate ramps up again over these steps
    command: str = ""  # the command line, recorded in the run's log

    def __post_init__(self) -> None:
        optional = ("image", "shape", "layout")  # the optional negatives, in the order their rows come
        for earlier, later in pairwise(optional):
            if getattr(self, f"{later}_negatives") and not getattr(self, f"{earlier}_negatives"):
                raise ValueError(f"{later} negatives come after {earlier} negatives: enable both")

    def path(self) -> Path:
        return self.out or MODELS_DIR / f"reranker-{self.kind}.safetensors"

    def run_log(self) -> Path:
        return self.path().with_suffix(".run.json")

    @property
    def negatives(self) -> int:
        return 4 + self.image_negatives + self.shape_negatives + self.layout_negatives


@dataclass
class PairBatch:
    """Image tokens, text tokens and masks for a set of (image, text) pairs, with match labels."""

    image: torch.Tensor  # (p, t, w_img)
    text: torch.Tensor  # (p, L, w_txt)
    mask: torch.Tensor  # (p, L) bool
    labels: torch.Tensor  # (p,) 1 = match
    kinds: list[str] = field(default_factory=list)
    ground: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (pair row, token position, (x, y))
    relate: tuple[torch.Tensor, torch.Tensor] | None = None  # (pair row, first-named minus second-named (x, y))


@dataclass
class Negatives:
    """One step's scenes: positives, two image-side negatives (hard twin, perturbed image) and two
    text-side negatives (order swap, perturbed caption) each."""

    positives: list[Scene]
    twins: list[Scene]
    order_swaps: list[Scene]  # relation negatives: places swapped (or a single object mirrored)
    perturbed: list[Scene]  # any kind of mistake: substitutions, swaps, a dropped object
    perturbed_images: list[Scene]  # the same kinds on the image side: the gallery's distractors
    shape_images: list[Scene]  # one object's shape changed (empty unless asked for)
    layout_images: list[Scene]  # transposed: the same objects in a column for a row (empty unless asked for)
    kinds: list[str]  # twin kind, caption perturbation kind, image perturbation kind, per positive


def _order_swap(scene: Scene, rng: np.random.Generator) -> Scene:
    if scene.layout == "single":
        return twin(scene, rng)[0]
    objs = list(scene.objects)
    i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
    objs[i], objs[j] = swap_fields(objs[i], objs[j], PLACE_FIELDS)
    return replace(scene, objects=tuple(objs))


def sample_negatives(seed: int, step: int, batch: int, image_negatives: bool = True,
                     shape_negatives: bool = False, layout_negatives: bool = False
                     ) -> tuple[Negatives, np.random.Generator]:
    """Relations are what the dual encoder misses most, so every positive gets an order swap.

    Each added kind of negative draws after the others: without image negatives the random stream
    is exactly that of the 4-negative recipe, without shape negatives that of the 5-negative one.
    """
    rng = np.random.default_rng([seed, 77, step])  # a stream disjoint from the encoder's
    positives = [scene_pair(seed + 1000, step * batch + i)[0].scene for i in range(batch)]
    twins, kinds = zip(*(twin(s, rng) for s in positives), strict=True)
    perturbed, p_kinds = zip(*(perturb(s, rng) for s in positives), strict=True)
    swaps = [_order_swap(s, rng) for s in positives]
    drawn = [perturb(s, rng) for s in positives] if image_negatives else []
    images, i_kinds = [s for s, _ in drawn], [k for _, k in drawn]
    shapes = [change_shape(s, rng)[0] for s in positives] if shape_negatives else []
    layouts = [transpose(s) for s in positives] if layout_negatives else []  # draws nothing: the stream is unchanged
    return Negatives(positives, list(twins), swaps, list(perturbed), images, shapes, layouts,
                     list(kinds) + list(p_kinds) + i_kinds), rng


def _mine(sim: np.ndarray, rng: np.random.Generator, temperature: float) -> np.ndarray:
    """For each text row, one other image sampled by similarity (ALBEF/BLIP hard-negative mining)."""
    logits = sim / temperature
    np.fill_diagonal(logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


GROUND_NOUNS = [*SHAPES, "shape"]  # a ref's noun: its shape word, or "shape" where the text leaves it out
GROUND_MODIFIERS = [*SIZES, *COLOURS]


def object_xy(obj: SceneObject) -> tuple[float, float]:
    """An object's centre in [-1, 1] image coordinates (the reranker's patch coordinates)."""
    x, y = object_position(obj)
    return x * 2 - 1, y * 2 - 1


def grounding_targets(encoder: DualEncoder, scenes: list[Scene], texts: list[str], claims: list[Description]
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Auxiliary targets from the generator's ground truth, for texts true of their scenes.

    Grounding: for every object a text names, (text row, its noun's token position, its (x, y)). A
    ref's noun is its shape word, or "shape" where the text leaves the shape out; nouns occur nowhere
    else, so the i-th noun token belongs to the i-th ref the text names. Only texts whose refs name
    one choice of objects get targets (not counts, not "a circle" in a scene of two circles).
    Relation: per text, the first-named object's (x, y) minus the second-named one's (one ref: its own).
    """
    noun_ids = {int(t) for t in encoder.tokenize(GROUND_NOUNS)[:, 1]}
    ids = encoder.tokenize(texts).cpu().numpy()
    rows, positions, xy, rel_rows, rel = [], [], [], [], []
    for row, (scene, text, claim, tokens) in enumerate(zip(scenes, texts, claims, ids, strict=True)):
        objects, order = grounding(claim, scene), mention_order(text, claim)
        where = [i for i, t in enumerate(tokens) if int(t) in noun_ids]
        if objects is None or order is None or len(where) != len(order):
            continue  # no single reading, or a tokenisation we do not expect: no target rather than a wrong one
        places = [object_xy(objects[i]) for i in order]
        rows += [row] * len(places)
        positions += where
        xy += places
        rel_rows.append(row)
        rel.append(places[0] if len(places) == 1 else (places[0][0] - places[1][0], places[0][1] - places[1][1]))
    return ((torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
             torch.tensor(xy, dtype=torch.float32).reshape(-1, 2)),
            (torch.tensor(rel_rows, dtype=torch.long), torch.tensor(rel, dtype=torch.float32).reshape(-1, 2)))


def _texts(neg: Negatives, rng: np.random.Generator, step_rng: np.random.Generator | None, share: float,
           hard_share: float = 0.0) -> tuple[list[str], list[Description]]:
    """Captions of the positives, their order swaps and perturbations (the text-side negatives).

    With step_rng, some positives are described as people write them instead, and so are their two
    text negatives, with the same choices (kind, objects, attributes left out, words) wherever the
    scenes' structure allows: the negative text differs from the positive only where the scenes do.
    """
    scenes = neg.positives + neg.order_swaps + neg.perturbed
    texts = [caption(s, rng) for s in scenes]  # always drawn: the caption recipe's random stream is unchanged
    claims = [caption_claim(s) for s in scenes]
    if step_rng is None:
        return texts, claims
    b = len(neg.positives)
    for i in range(b):
        if step_rng.random() >= share:
            continue
        group = [i, i + b, i + 2 * b]
        kind, seed = _kind(neg.positives[i], step_rng, hard_share), int(step_rng.integers(2**62))
        for row in group:
            written = _described(scenes[row], kind, seed)
            texts[row], claims[row] = written.text, written.claim
    return texts, claims


def _kind(scene: Scene, rng: np.random.Generator, hard_share: float) -> str:
    """A kind of description the scene allows: with probability `hard_share` one the tiers learn last
    (two of three objects; for two objects, a count or sizes left out), otherwise any, uniformly."""
    if hard_share > 0 and rng.random() < hard_share:
        if allowed(scene, "two_of_three"):
            return "two_of_three"
        return pick(rng, [k for k in ("count", "no_size") if allowed(scene, k)])
    return pick(rng, [k for k in KINDS if allowed(scene, k)])


def _described(scene: Scene, kind: str, seed: int) -> Written:
    return describe(scene, np.random.default_rng(seed), kind if allowed(scene, kind) else None)


def make_pairs(encoder: DualEncoder, cfg: RerankTrainConfig, step: int) -> PairBatch:
    """Per positive: its twin and a perturbed image, an order-swapped and a perturbed text, an ITC-mined image.

    The perturbed image (a shape, colour or size changed, an object dropped...) is what a gallery
    holds next to the right image; the caption-side negatives alone left shape errors unlearnt.
    Every pair's label is whether its text is true of its image: a partial description is often
    true of a twin or a perturbed image, and then it is a positive, never a negative.
    """
    neg, rng = sample_negatives(cfg.seed, step, cfg.batch, cfg.image_negatives, cfg.shape_negatives,
                                cfg.layout_negatives)
    size = int(encoder.model.visual.image_size[0])
    step_rng = np.random.default_rng([cfg.seed, 78, step]) if cfg.describe_share > 0 else None
    texts, claims = _texts(neg, rng, step_rng, cfg.describe_share, cfg.hard_share)
    image_scenes = neg.positives + neg.twins + neg.perturbed_images + neg.shape_images + neg.layout_images
    img_emb, img_tok = encoder.encode_images_and_tokens([render(s, size) for s in image_scenes])
    txt_emb, txt_tok, txt_mask = encoder.encode_texts_and_tokens(texts)
    b = cfg.batch
    pos = np.arange(b)
    mined = _mine(txt_emb[:b] @ img_emb[:b].T, rng, cfg.mined_temperature)
    pairs = (1 + cfg.negatives) * b  # optional negatives come last: a lighter recipe's rows are a prefix
    image_rows = np.concatenate([pos, pos + b, pos, pos, mined, pos + 2 * b, pos + 3 * b, pos + 4 * b])[:pairs]
    text_rows = np.concatenate([pos, pos, pos + b, pos + 2 * b, pos, pos, pos, pos])[:pairs]
    labels = np.array([holds(claims[t], image_scenes[i]) for i, t in zip(image_rows, text_rows, strict=True)])
    kinds = (["positive"] * b + neg.kinds[:b] + ["order_swap"] * b + neg.kinds[b : 2 * b] + ["mined"] * b
             + [f"image_{k}" for k in neg.kinds[2 * b :]] + ["image_shape_change"] * len(neg.shape_images)
             + ["image_transposed"] * len(neg.layout_images))
    return PairBatch(
        torch.from_numpy(img_tok[image_rows]), torch.from_numpy(txt_tok[text_rows]),
        torch.from_numpy(txt_mask[text_rows]), torch.from_numpy(labels).long(), kinds,
        *grounding_targets(encoder, neg.positives, texts[:b], claims[:b]),  # pair rows 0..b-1 are the positives
    )


def pair_loss(model: Matcher, batch: PairBatch, class_weight: torch.Tensor, ground_weight: float,
              teacher: Matcher | None = None, distill_weight: float = 1.0) -> torch.Tensor:
    """ITM cross-entropy, plus the grounding loss (MSE of named objects' positions) when enabled, plus with a
    teacher the divergence from its 2-way distribution on every pair (how sure it is, not only which side)."""
    logits, hidden, enc = model.encode(batch.image, batch.text, batch.mask)
    loss = F.cross_entropy(logits, batch.labels, weight=class_weight)
    if teacher is not None:
        with torch.no_grad():
            target = F.log_softmax(teacher(batch.image, batch.text, batch.mask), dim=-1)
        loss = loss + distill_weight * F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True,
                                                reduction="batchmean")
    if ground_weight > 0 and model.cfg.ground and batch.ground is not None and len(batch.ground[0]):
        rows, positions, xy = batch.ground
        loss = loss + ground_weight * F.mse_loss(model.locate(hidden[rows, 1 + positions]), xy)  # 1: [ENC]
    if ground_weight > 0 and model.cfg.ground and batch.relate is not None and len(batch.relate[0]):
        rows, delta = batch.relate
        loss = loss + ground_weight * F.mse_loss(model.relate(enc[rows]), delta)
    return loss


def new_matcher(encoder: DualEncoder, cfg: RerankTrainConfig) -> Matcher:
    torch.manual_seed(cfg.seed)
    if cfg.init is not None:
        model = load_reranker(cfg.init)
        same_shapes = (model.cfg.image_tokens, model.cfg.image_width) == tuple(encoder.token_shape)
        architecture = model.cfg.encoder_id.split("@")[0] == encoder.model_id.split("@")[0]
        if model.cfg.kind != cfg.kind or not (same_shapes and architecture):
            raise ValueError(f"{cfg.init} is a {model.cfg.kind} reranker for {model.cfg.encoder_id!r}; "
                             f"cannot continue it as {cfg.kind} for {encoder.model_id!r}")
        model.cfg.encoder_id = encoder.model_id  # a warm start onto a fine-tuned encoder of the same architecture
        if model.cfg.ground:
            model.cfg.nouns, model.cfg.modifiers = list(GROUND_NOUNS), list(GROUND_MODIFIERS)
        model = shallower(model, cfg.layers or model.cfg.layers)
        return with_image_mix(model, cfg.image_mix) if cfg.image_mix else model
    text_width = int(encoder.model.transformer.width)
    return Matcher(RerankerConfig(kind=cfg.kind, width=cfg.width, layers=cfg.layers or 3, text_width=text_width,
                                  image_width=encoder.token_shape[1], image_tokens=encoder.token_shape[0],
                                  encoder_id=encoder.model_id, coords=True, ground=cfg.ground_weight > 0,
                                  image_mix=cfg.image_mix, nouns=list(GROUND_NOUNS) if cfg.ground_weight > 0 else [],
                                  modifiers=list(GROUND_MODIFIERS) if cfg.ground_weight > 0 else []))


def shallower(model: Matcher, layers: int) -> Matcher:
    """A mid matcher cut to its first `layers` blocks (a warm start for a cheaper reranker: the last block runs
    at [ENC] only, so each block cut saves a whole block's text rows per candidate); `layers` as deep: unchanged."""
    if layers == model.cfg.layers:
        return model
    if model.cfg.kind != "mid" or not 0 < layers < model.cfg.layers or layers <= model.cfg.ground_layer:
        raise ValueError(f"cannot cut a {model.cfg.layers}-layer {model.cfg.kind} reranker (grounded at layer "
                         f"{model.cfg.ground_layer}) to {layers} layers: only a mid one, to fewer, past its grounding")
    model.blocks = model.blocks[:layers]
    model.cfg.layers = layers
    return model


def with_image_mix(model: Matcher, hidden: int) -> Matcher:
    """The same matcher plus an image-side block whose output starts at zero: its scores are unchanged."""
    if model.cfg.image_mix == hidden:
        return model
    if model.cfg.image_mix:
        raise ValueError(f"the checkpoint already has an image block of width {model.cfg.image_mix}, not {hidden}")
    grown = Matcher(replace(model.cfg, image_mix=hidden))
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("image_mix.") for key in missing):
        raise ValueError(f"cannot add an image block: unexpected {unexpected}, missing {missing}")
    return grown.train(model.training)


def train_reranker(encoder: DualEncoder, cfg: RerankTrainConfig, on_step: Callable[[int, float], None] | None = None,
                   pairs: Callable[[int], PairBatch] | None = None) -> tuple[Matcher, dict[str, object]]:
    """Train a mid or early fusion matcher on `pairs` of each step (default: the scene recipe, make_pairs);
    positives weigh as much as their negatives in the loss.

    A run saves its weights and log every cfg.save_every steps; the same command resumes it.
    """
    pairs = pairs or (lambda at: make_pairs(encoder, cfg, at))
    cfg.path().parent.mkdir(parents=True, exist_ok=True)
    log = resume_log(cfg.run_log(), cfg.path(), cfg.command)
    resumed = log.step
    model = (_resumed(cfg, encoder) if resumed else new_matcher(encoder, cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    teacher = _teacher(cfg, encoder)
    losses = log.losses
    start = time.perf_counter() - log.seconds
    for step in range(resumed, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, resumed)
        batch = pairs(cfg.first_step + step)
        positives = max(1, int(batch.labels.sum()))
        class_weight = torch.tensor([1.0, (len(batch.labels) - positives) / positives])
        loss = pair_loss(model, batch, class_weight, cfg.ground_weight, teacher, cfg.distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        if on_step:
            on_step(step, losses[-1])
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_reranker(model, cfg.path())
            log.step, log.seconds = step + 1, round(time.perf_counter() - start, 1)
            save_log(cfg.run_log(), log, cfg)
    model.eval()
    log.step, log.seconds = cfg.steps, round(time.perf_counter() - start, 1)
    save_log(cfg.run_log(), log, cfg)
    return model, {"seconds": log.seconds, "losses": losses, "commands": log.commands}


def _teacher(cfg: RerankTrainConfig, encoder: DualEncoder) -> Matcher | None:
    """The frozen teacher a run distils, checked to be of its kind and to read this encoder's tokens."""
    if cfg.teacher is None:
        return None
    teacher = load_reranker(cfg.teacher).eval().requires_grad_(False)
    if teacher.cfg.kind != cfg.kind or not encoder.is_model(teacher.cfg.encoder_id):
        raise ValueError(f"the teacher {cfg.teacher} is a reranker of kind {teacher.cfg.kind} over "
                         f"{teacher.cfg.encoder_id!r}; this run trains kind {cfg.kind} over {encoder.model_id!r}")
    return teacher


def _resumed(cfg: RerankTrainConfig, encoder: DualEncoder) -> Matcher:
    model = load_reranker(cfg.path())
    if not encoder.is_model(model.cfg.encoder_id):
        raise ValueError(f"the run in {cfg.path()} trains over {model.cfg.encoder_id!r}, not {encoder.model_id!r}")
    return model
