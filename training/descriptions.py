"""Training floor, data: descriptions of scenes as people write them (any subset of attributes and objects,
relation synonyms, counts), and the one function that decides whether a description is true of a scene."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from training.scenes import COLOURS, SHAPES, SINGLE_POSITIONS, SIZES, Scene, SceneObject, stream

T = TypeVar("T")

# what the generator writes, by kind; the freeform evaluation asks each kind
KINDS = ("full", "no_size", "two_of_three", "one_object", "relation_synonym", "count", "styled")
NUMBERS = {2: "two", 3: "three"}
PLACES = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left_of", "above", "next_to")


@dataclass(frozen=True)
class Ref:
    """An object as a description names it: each attribute, or None where the description leaves it out."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return all(want is None or want == have for want, have in zip(self.attrs(), obj.attrs(), strict=True))

    def attrs(self) -> tuple[str | None, str | None, str | None]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Description:
    """What a text claims: objects (refs), relations between them, places in the image, or a count.

    relations: (name, i, j) with name in RELATIONS: refs[i] left of / above / next to refs[j].
    places: (i, place) with place in PLACES: where refs[i] is in the image.
    count: exactly this many objects match refs[0] (a description of one ref, nothing else).
    """

    refs: tuple[Ref, ...]
    relations: tuple[tuple[str, int, int], ...] = ()
    places: tuple[tuple[int, str], ...] = ()
    count: int | None = None


def _related(name: str, a: SceneObject, b: SceneObject) -> bool:
    if name == "left_of":
        return a.col < b.col
    if name == "above":
        return a.row < b.row
    return a.row == b.row and a.col != b.col  # next_to: side by side, either order


def _placed(place: str, obj: SceneObject) -> bool:
    return {"left": obj.col == 0, "right": obj.col == 2, "top": obj.row == 0, "bottom": obj.row == 2,
            "centre": (obj.col, obj.row) == (1, 1)}[place]


def holds(description: Description, scene: Scene) -> bool:
    """Whether the description is true of the scene: every named object exists with the named
    attributes (distinct objects for distinct refs), every named relation and place holds; a count
    holds when exactly that many objects match."""
    if description.count is not None:
        return sum(description.refs[0].matches(o) for o in scene.objects) == description.count
    return next(_satisfying(description, scene), None) is not None


def _satisfying(description: Description, scene: Scene) -> Iterator[tuple[SceneObject, ...]]:
    """Every choice of distinct objects, one per ref, that makes the (non-count) description true."""
    for chosen in itertools.permutations(scene.objects, len(description.refs)):
        if (all(r.matches(o) for r, o in zip(description.refs, chosen, strict=True))
                and all(_related(n, chosen[i], chosen[j]) for n, i, j in description.relations)
                and all(_placed(p, chosen[i]) for i, p in description.places)):
            yield chosen


# --- writing ----------------------------------------------------------------------------------------

PLACE_WORDS = {
    "left": ("{a} on the left", "{a} on the left side"), "right": ("{a} on the right", "{a} on the right side"),
    "top": ("{a} at the top", "{a} near the top"), "bottom": ("{a} at the bottom", "{a} near the bottom"),
    "centre": ("{a} in the centre", "{a} in the middle"),
}
# (template, relation as the description claims it, with a = the first object in reading order)
PLAIN = {
    "horizontal": (("{a} left of {b}", "left_of", 0, 1), ("{b} right of {a}", "left_of", 0, 1)),
    "vertical": (("{a} above {b}", "above", 0, 1), ("{b} below {a}", "above", 0, 1)),
}
SYNONYMS = {
    "horizontal": (("{a} to the left of {b}", "left_of", 0, 1), ("{b} to the right of {a}", "left_of", 0, 1),
                   ("{a} next to {b}", "next_to", 0, 1), ("{b} next to {a}", "next_to", 1, 0),
                   ("{a} beside {b}", "next_to", 0, 1), ("{b} beside {a}", "next_to", 1, 0)),
    "vertical": (("{a} over {b}", "above", 0, 1), ("{a} on top of {b}", "above", 0, 1),
                 ("{b} under {a}", "above", 0, 1), ("{b} beneath {a}", "above", 0, 1)),
}
TRIPLES = {
    "horizontal": ("{a}, {b} and {c} from left to right", "{c}, {b} and {a} from right to left"),
    "vertical": ("{a}, {b} and {c} from top to bottom", "{c}, {b} and {a} from bottom to top"),
}


def phrase(ref: Ref, number: int = 1) -> str:
    """'a small red circle', 'an orange shape', 'two red shapes'."""
    noun = ref.shape or "shape"
    if number > 1:
        noun += "es" if noun.endswith(("s", "x")) else "s"
    words = [w for w in (ref.size, ref.colour) if w] + [noun]
    if number > 1:
        return f"{NUMBERS[number]} {' '.join(words)}"
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def _ref(obj: SceneObject, size: bool = True, colour: bool = True, shape: bool = True) -> Ref:
    return Ref(obj.size if size else None, obj.colour if colour else None, obj.shape if shape else None)


@dataclass
class Written:
    """A generated description: its text, what it claims, and which kind of query it is."""

    text: str
    claim: Description
    kind: str


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


Template = tuple[str, str, int, int]


def _relate(refs: tuple[Ref, ...], templates: tuple[Template, ...], rng: np.random.Generator) -> Written:
    template, name, i, j = templates[int(rng.integers(len(templates)))]
    text = template.format(a=phrase(refs[0]), b=phrase(refs[1]))
    return Written(text, Description(refs, ((name, i, j),)), "")


def _single(scene: Scene, ref: Ref, rng: np.random.Generator) -> Written:
    obj = scene.objects[0]
    place = SINGLE_POSITIONS[(obj.col, obj.row)]
    template = pick(rng, PLACE_WORDS[place])
    return Written(template.format(a=phrase(ref)), Description((ref,), places=((0, place),)), "")


def _whole(scene: Scene, rng: np.random.Generator, size: bool, synonyms: bool) -> Written:
    """Every object of the scene, with its relations (or its place, for one object)."""
    refs = tuple(_ref(o, size=size) for o in scene.objects)
    if len(refs) == 1:
        return _single(scene, refs[0], rng)
    if len(refs) == 2:
        return _relate(refs, (SYNONYMS if synonyms else PLAIN)[scene.layout], rng)
    template = pick(rng, TRIPLES[scene.layout])
    name = "left_of" if scene.layout == "horizontal" else "above"
    text = template.format(a=phrase(refs[0]), b=phrase(refs[1]), c=phrase(refs[2]))
    return Written(text, Description(refs, ((name, 0, 1), (name, 1, 2))), "")


def _two_of_three(scene: Scene, rng: np.random.Generator) -> Written:
    i, j = sorted(int(v) for v in rng.choice(3, size=2, replace=False))
    refs = (_ref(scene.objects[i], size=False), _ref(scene.objects[j], size=False))
    return _relate(refs, PLAIN[scene.layout] + SYNONYMS[scene.layout], rng)


def _one_object(scene: Scene, rng: np.random.Generator) -> Written:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    size, colour, shape = pick(rng, ((False, True, True), (False, True, False), (False, False, True),
                                      (True, True, False), (True, False, True), (True, True, True)))
    ref = _ref(obj, size, colour, shape)
    return Written(phrase(ref), Description((ref,)), "")


def _count(scene: Scene, rng: np.random.Generator) -> Written | None:
    """'two red shapes', 'two circles', 'three shapes': exactly as many as the scene holds."""
    options = [Ref()] if len(scene.objects) > 1 else []
    for name in ("colour", "shape", "size"):
        for value in sorted({getattr(o, name) for o in scene.objects}):
            ref = Ref(**{name: value})
            if sum(ref.matches(o) for o in scene.objects) > 1:
                options.append(ref)
    if not options:
        return None
    ref = options[int(rng.integers(len(options)))]
    number = sum(ref.matches(o) for o in scene.objects)
    return Written(phrase(ref, number), Description((ref,), count=number), "")


def styled(text: str, rng: np.random.Generator) -> str:
    """The text as people type it: capitals, a full stop or none, stray spaces."""
    case = pick(rng, (str.capitalize, str.title, str.upper, str.lower))
    return f"{pick(rng, ('', ' '))}{case(text)}{pick(rng, ('', '.', '.', '!', ' '))}"


def describe(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Written:
    """A description of the scene of the given kind (drawn when None, among those the scene allows)."""
    kinds = [k for k in KINDS if allowed(scene, k)]
    kind = kind or pick(rng, kinds)
    if kind not in kinds:
        raise ValueError(f"a {scene.layout} scene of {len(scene.objects)} objects has no {kind!r} description")
    if kind == "count":
        written = _count(scene, rng)
        assert written is not None
    elif kind == "two_of_three":
        written = _two_of_three(scene, rng)
    elif kind == "one_object":
        written = _one_object(scene, rng)
    elif kind == "styled":
        inner = describe(scene, rng, pick(rng, [k for k in kinds if k != "styled"]))
        written = Written(styled(inner.text, rng), inner.claim, "")
    else:
        written = _whole(scene, rng, size=kind != "no_size", synonyms=kind == "relation_synonym")
    written.kind = kind
    return written


def allowed(scene: Scene, kind: str) -> bool:
    """Whether a scene can be described with a kind (two of three needs three objects, ...)."""
    n = len(scene.objects)
    return {"two_of_three": n == 3, "relation_synonym": n == 2, "count": _count(scene, np.random.default_rng(0))
            is not None}.get(kind, True)


VOCABULARY = {"colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
              "relations": ["left of", "right of", "next to", "beside", "above", "over", "on top of", "below",
                            "under", "beneath", "from left to right", "from top to bottom"]}
EXAMPLE_KINDS = ("one_object", "count", "no_size", "relation_synonym", "two_of_three")  # short ones first


@functools.cache
def example_queries(seed: int = 3) -> tuple[str, ...]:  # seed 3: its first examples read well
    """One description of each example kind that names a colour, of the seed's first scenes that allow
    it: what a user may type to the embedded model (the page offers them to click)."""
    rng = np.random.default_rng([seed, 5])
    found: dict[str, str] = {}
    for first, _ in stream(seed):
        kind = next((k for k in EXAMPLE_KINDS if k not in found and allowed(first.scene, k)), None)
        text = describe(first.scene, rng, kind).text if kind else ""
        if kind and set(text.lower().split()) & set(COLOURS):  # "a triangle" tells a user little
            found[kind] = text
        if len(found) == len(EXAMPLE_KINDS):
            return tuple(found[k] for k in EXAMPLE_KINDS)
    raise AssertionError("unreachable: the stream is endless")


def caption_claim(scene: Scene) -> Description:
    """What the generator's grammar caption of the scene claims: every object with all its attributes,
    and the layout's relations (or, for one object, its place)."""
    return _whole(scene, np.random.default_rng(0), size=True, synonyms=False).claim


def grounding(description: Description, scene: Scene) -> tuple[SceneObject, ...] | None:
    """The objects the description's refs name, when exactly one choice of objects makes it true
    (None for a count, a false description, or one that several choices satisfy)."""
    if description.count is not None:
        return None
    found = list(itertools.islice(_satisfying(description, scene), 2))
    return found[0] if len(found) == 1 else None


def mention_order(text: str, description: Description) -> list[int] | None:
    """The refs' indices in the order the text names them (None when a ref's phrase is not found
    as written, or two refs read the same)."""
    lowered = " ".join(text.lower().split())
    where = [lowered.find(phrase(ref)) for ref in description.refs]
    if min(where, default=-1) < 0 or len(set(where)) != len(where):
        return None
    return sorted(range(len(where)), key=where.__getitem__)
