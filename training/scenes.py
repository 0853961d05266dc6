"""Training floor, data: seeded procedural scenes with captions and hard twins (training data and benchmark)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 225, 30),
    "purple": (140, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 220, 230),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.075, "large": 0.135}  # half-extent as a fraction of the image side
CELL_CENTRES = (1 / 6, 1 / 2, 5 / 6)  # a 3x3 grid: objects in distinct cells never overlap
SINGLE_POSITIONS = {(0, 1): "left", (2, 1): "right", (1, 0): "top", (1, 2): "bottom", (1, 1): "centre"}
N_OBJECTS_P = (0.2, 0.5, 0.3)  # probability of 1, 2, 3 objects

# Reserved seeds: training streams use TRAIN_SEED, score-fusion fitting VAL_SEED, evaluation the others.
TRAIN_SEED = 0
VAL_SEED = 1
EVAL_SEED = 2026


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: attributes plus its grid cell (col, row) and pixel jitter."""

    colour: str
    shape: str
    size: str
    col: int
    row: int
    dx: float = 0.0
    dy: float = 0.0

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def attrs(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """A scene: objects ordered left→right (horizontal) or top→bottom (vertical)."""

    objects: tuple[SceneObject, ...]
    layout: str  # "single" | "horizontal" | "vertical"
    background: tuple[int, int, int] = (20, 20, 20)

    def key(self) -> str:
        """Canonical description: two scenes with the same key are described identically."""
        if self.layout == "single":
            obj = self.objects[0]
            return f"single:{SINGLE_POSITIONS[(obj.col, obj.row)]}:{' '.join(obj.attrs())}"
        return f"{self.layout}:" + "|".join(" ".join(o.attrs()) for o in self.objects)

    def to_dict(self) -> dict[str, object]:
        return {"layout": self.layout, "objects": [asdict(o) for o in self.objects], "key": self.key()}


# --- captions -------------------------------------------------------------------------------------

SINGLE_TEMPLATES = {
    "left": ("{a} on the left", "{a} on the left side"),
    "right": ("{a} on the right", "{a} on the right side"),
    "top": ("{a} at the top", "{a} near the top"),
    "bottom": ("{a} at the bottom", "{a} near the bottom"),
    "centre": ("{a} in the centre", "{a} in the middle"),
}
PAIR_TEMPLATES = {  # a is left of / above b
    "horizontal": ("{a} left of {b}", "{a} to the left of {b}", "{b} right of {a}", "{b} to the right of {a}"),
    "vertical": ("{a} above {b}", "{b} below {a}", "{b} beneath {a}"),
}
TRIPLE_TEMPLATES = {  # a, b, c in reading order
    "horizontal": ("{a}, {b} and {c} from left to right", "{c}, {b} and {a} from right to left"),
    "vertical": ("{a}, {b} and {c} from top to bottom", "{c}, {b} and {a} from bottom to top"),
}


def caption_templates(scene: Scene) -> tuple[str, ...]:
    """All phrasings of a scene's description (format with a, b, c = object phrases)."""
    if scene.layout == "single":
        obj = scene.objects[0]
        return SINGLE_TEMPLATES[SINGLE_POSITIONS[(obj.col, obj.row)]]
    table = PAIR_TEMPLATES if len(scene.objects) == 2 else TRIPLE_TEMPLATES
    return table[scene.layout]


def captions(scene: Scene) -> list[str]:
    """Every phrasing of the scene's caption."""
    names = dict(zip("abc", (o.phrase() for o in scene.objects), strict=False))
    return [t.format(**names) for t in caption_templates(scene)]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One phrasing, chosen with rng."""
    options = captions(scene)
    return options[int(rng.integers(len(options)))]


# --- sampling -------------------------------------------------------------------------------------


def _random_attrs(rng: np.random.Generator) -> tuple[str, str, str]:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    return colour, shape, size


def _distinct_attrs(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """n attribute triples, pairwise different, so every multi-object scene has a twin."""
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        attrs = _random_attrs(rng)
        if attrs not in out:
            out.append(attrs)
    return out


def _cells(rng: np.random.Generator, n: int) -> tuple[str, list[tuple[int, int]]]:
    if n == 1:
        cells = list(SINGLE_POSITIONS)
        return "single", [cells[int(rng.integers(len(cells)))]]
    layout = "horizontal" if rng.random() < 0.5 else "vertical"
    line = int(rng.integers(3))  # the shared row (horizontal) or column (vertical)
    slots = sorted(int(s) for s in rng.choice(3, size=n, replace=False))
    if layout == "horizontal":
        return layout, [(s, line) for s in slots]
    return layout, [(line, s) for s in slots]


def random_scene(rng: np.random.Generator) -> Scene:
    """Sample a scene: 1–3 objects with distinct attributes in distinct grid cells."""
    n = int(rng.choice(3, p=N_OBJECTS_P)) + 1
    layout, cells = _cells(rng, n)
    objects = tuple(
        SceneObject(colour, shape, size, col, row, float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03)))
        for (colour, shape, size), (col, row) in zip(_distinct_attrs(rng, n), cells, strict=True)
    )
    background = tuple(int(v) for v in rng.integers(0, 45, size=3))
    return Scene(objects, layout, background)  # type: ignore[arg-type]


# --- twins ----------------------------------------------------------------------------------------

MIRROR = {(0, 1): (2, 1), (2, 1): (0, 1), (1, 0): (1, 2), (1, 2): (1, 0)}
SWAP_FIELDS = {"colour_swap": ("colour",), "shape_swap": ("shape",), "size_swap": ("size",)}


PLACE_FIELDS = ("colour", "shape", "size")  # all of them swapped: the two objects swap places


def swap_fields(a: SceneObject, b: SceneObject, fields: tuple[str, ...]) -> tuple[SceneObject, SceneObject]:
    """The two objects with these attributes exchanged."""
    return (replace(a, **{f: getattr(b, f) for f in fields}), replace(b, **{f: getattr(a, f) for f in fields}))


def twin(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """The scene's hard twin and its kind: same objects, but bindings or relations changed.

    Single objects move to the mirrored position (a centred one changes size). With two or three
    objects, a pair either swaps one attribute (colour, shape or size) or swaps places, which is
    the left/right (or above/below) swap.
    """
    objs = list(scene.objects)
    if scene.layout == "single":
        obj = objs[0]
        if (obj.col, obj.row) in MIRROR:
            col, row = MIRROR[(obj.col, obj.row)]
            kind = "lr_swap" if obj.row == 1 else "tb_swap"
            return replace(scene, objects=(replace(obj, col=col, row=row),)), kind
        flipped = "large" if obj.size == "small" else "small"
        return replace(scene, objects=(replace(obj, size=flipped),)), "size_change"
    i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
    others = {o.attrs() for k, o in enumerate(objs) if k not in (i, j)}
    # an attribute swap that turns one of the pair into a copy of a third object would make two
    # objects alike (and the caption ambiguous); swapping places never does
    kinds = [k for k, fs in SWAP_FIELDS.items() if any(getattr(objs[i], f) != getattr(objs[j], f) for f in fs)
             and others.isdisjoint(o.attrs() for o in swap_fields(objs[i], objs[j], fs))]
    kinds.append("lr_swap" if scene.layout == "horizontal" else "tb_swap")
    kind = kinds[int(rng.integers(len(kinds)))]
    fields = PLACE_FIELDS if kind in ("lr_swap", "tb_swap") else SWAP_FIELDS[kind]
    objs[i], objs[j] = swap_fields(objs[i], objs[j], fields)
    return replace(scene, objects=tuple(objs)), kind


NEGATIVE_KINDS = ("swap", "colour_change", "shape_change", "size_change", "position_change", "drop_object")


def _change(obj: SceneObject, field: str, rng: np.random.Generator) -> SceneObject:
    choices = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[field]
    others = [c for c in choices if c != getattr(obj, field)]
    new = others[int(rng.integers(len(others)))]
    if field == "colour":
        return replace(obj, colour=new)
    return replace(obj, shape=new) if field == "shape" else replace(obj, size=new)


def _drop(scene: Scene, rng: np.random.Generator) -> Scene:
    objs = list(scene.objects)
    objs.pop(int(rng.integers(len(objs))))
    if len(objs) > 1:
        return replace(scene, objects=tuple(objs))
    (obj,) = objs  # the survivor of a pair becomes a single object at the matching named position
    slot = obj.col if scene.layout == "horizontal" else obj.row
    cell = {"horizontal": [(0, 1), (1, 1), (2, 1)], "vertical": [(1, 0), (1, 1), (1, 2)]}[scene.layout][slot]
    return Scene((replace(obj, col=cell[0], row=cell[1]),), "single", scene.background)


def perturb(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """A compositional negative: every kind of mistake a dual encoder makes, one at a time.

    Kinds: swap (a hard twin: attributes or places swapped between objects), colour/shape/size
    change of one object, position change of a single object, or an object dropped.
    """
    if rng.random() < 0.4:  # swaps are the hardest negatives (the twin gallery is made of them)
        return twin(scene, rng)
    for _ in range(20):
        kind = NEGATIVE_KINDS[1 + int(rng.integers(len(NEGATIVE_KINDS) - 1))]
        out = _apply(scene, kind, rng)
        if out is not None:
            return out, kind
    return twin(scene, rng)


def transpose(scene: Scene) -> Scene:
    """The scene mirrored about its diagonal: a row of objects becomes a column in the same order, so
    "left of" becomes "above" and "beside" "on top of", while every object and its attributes stay."""
    layout = {"horizontal": "vertical", "vertical": "horizontal"}.get(scene.layout, scene.layout)
    objects = tuple(replace(o, col=o.row, row=o.col, dx=o.dy, dy=o.dx) for o in scene.objects)
    return replace(scene, objects=objects, layout=layout)


def change_shape(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """One object drawn as another shape: the near-duplicate a reranker over 64 px tokens misses most."""
    for _ in range(20):
        out = _apply(scene, "shape_change", rng)
        if out is not None:
            return out, "shape_change"
    return perturb(scene, rng)


def _apply(scene: Scene, kind: str, rng: np.random.Generator) -> Scene | None:
    """The scene with one mistake of `kind`, or None when this draw cannot make a distinct scene."""
    if kind == "drop_object" and len(scene.objects) > 1:
        out = _drop(scene, rng)
    elif kind == "position_change" and scene.layout == "single":
        cells = [c for c in SINGLE_POSITIONS if c != (scene.objects[0].col, scene.objects[0].row)]
        col, row = cells[int(rng.integers(len(cells)))]
        out = replace(scene, objects=(replace(scene.objects[0], col=col, row=row),))
    elif kind.endswith("_change") and kind != "position_change":
        objs = list(scene.objects)
        i = int(rng.integers(len(objs)))
        objs[i] = _change(objs[i], kind.removesuffix("_change"), rng)
        out = replace(scene, objects=tuple(objs))
    else:
        return None
    distinct = len({o.attrs() for o in out.objects}) == len(out.objects) and out.key() != scene.key()
    return out if distinct else None


# --- rendering ------------------------------------------------------------------------------------


def object_position(obj: SceneObject) -> tuple[float, float]:
    """An object's centre (x, y) as fractions of the image side."""
    return CELL_CENTRES[obj.col] + obj.dx, CELL_CENTRES[obj.row] + obj.dy


def object_centre(obj: SceneObject, size: int) -> tuple[int, int]:
    """Pixel centre of an object in an image of side `size`."""
    x, y = object_position(obj)
    return round(x * size), round(y * size)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    cx, cy = object_centre(obj, size)
    h = max(2.0, SIZES[obj.size] * size)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "square":
        s = h * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif obj.shape == "cross":
        t = max(1.0, h * 0.35)
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of side `size` (no anti-aliasing, so colours stay exact)."""
    if size < 16:
        raise ValueError(f"image size must be at least 16 px, got {size}")
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, size)
    return image


# --- streams and files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A rendered scene with one caption; `twin` links a scene and its hard twin by index."""

    scene: Scene
    caption: str
    index: int
    twin_kind: str | None = None  # set on the twin


def scene_pair(seed: int, index: int) -> tuple[Sample, Sample]:
    """Scene `index` of stream `seed` and its hard twin, each with a sampled phrasing."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    other, kind = twin(scene, rng)
    return Sample(scene, caption(scene, rng), index), Sample(other, caption(other, rng), index, kind)


def stream(seed: int, start: int = 0) -> Iterator[tuple[Sample, Sample]]:
    """Endless deterministic stream of (scene, twin) pairs."""
    index = start
    while True:
        yield scene_pair(seed, index)
        index += 1


def twin_gallery(n: int, seed: int) -> list[Sample]:
    """n images as (scene, twin) pairs in which no two images share a description.

    Returns samples ordered [s0, t0, s1, t1, ...]; the twin of sample i is i ^ 1.
    """
    if n < 2 or n % 2:
        raise ValueError(f"a twin gallery needs an even n >= 2, got {n}")
    seen: set[str] = set()
    out: list[Sample] = []
    for first, second in stream(seed):
        keys = (first.scene.key(), second.scene.key())
        if keys[0] in seen or keys[1] in seen or keys[0] == keys[1]:
            continue
        seen.update(keys)
        out += [first, second]
        if len(out) >= n:
            return out
    raise AssertionError("unreachable: the stream is endless")


def write_scenes(out_dir: Path, n: int, seed: int, twins: bool = False, size: int = 64) -> Path:
    """Write n scenes (and their twins) as PNGs plus captions.jsonl; returns the jsonl path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "captions.jsonl"
    with manifest.open("w", encoding="utf-8") as fh:
        for index in range(n):
            first, second = scene_pair(seed, index)
            pair = (first, second) if twins else (first,)
            for sample in pair:
                fh.write(json.dumps(_write_sample(out_dir, sample, size)) + "\n")
    return manifest


def _write_sample(out_dir: Path, sample: Sample, size: int) -> dict[str, object]:
    name = f"scene_{sample.index:07d}{'_twin' if sample.twin_kind else ''}.png"
    render(sample.scene, size).save(out_dir / name)
    record: dict[str, object] = {"file": name, "caption": sample.caption, "scene": sample.scene.to_dict()}
    if sample.twin_kind:
        record["twin_of"] = f"scene_{sample.index:07d}.png"
        record["twin_kind"] = sample.twin_kind
    return record
