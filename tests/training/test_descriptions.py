"""Descriptions as people write them: the truth function on hand-made scenes, and every generated
description true of its own scene, deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from training.descriptions import (
    KINDS,
    VOCABULARY,
    Description,
    Ref,
    allowed,
    caption_claim,
    describe,
    example_queries,
    grounding,
    holds,
    mention_order,
    phrase,
)
from training.scenes import Scene, SceneObject, captions, scene_pair

RED_CIRCLE = SceneObject("red", "circle", "small", 0, 1)
BLUE_SQUARE = SceneObject("blue", "square", "large", 2, 1)
GREEN_CROSS = SceneObject("green", "cross", "small", 1, 1)
PAIR = Scene((RED_CIRCLE, BLUE_SQUARE), "horizontal")  # red circle left, blue square right
ROW = Scene((RED_CIRCLE, GREEN_CROSS, BLUE_SQUARE), "horizontal")
COLUMN = Scene((SceneObject("red", "circle", "small", 1, 0), SceneObject("red", "square", "large", 1, 2)), "vertical")


@pytest.mark.parametrize(("claim", "scene", "true"), [
    (Description((Ref(colour="red", shape="circle"),)), PAIR, True),  # sizes left out
    (Description((Ref(colour="green", shape="circle"),)), PAIR, False),
    (Description((Ref("large", "red", "circle"),)), PAIR, False),  # the size is wrong
    (Description((Ref(colour="red"), Ref(shape="square")), (("left_of", 0, 1),)), PAIR, True),
    (Description((Ref(colour="red"), Ref(shape="square")), (("left_of", 1, 0),)), PAIR, False),  # false relation
    (Description((Ref(colour="blue"), Ref(colour="red")), (("next_to", 0, 1),)), PAIR, True),  # either order
    (Description((Ref(colour="red"), Ref(colour="blue")), (("above", 0, 1),)), PAIR, False),
    (Description((Ref(colour="red"), Ref(colour="blue")), (("left_of", 0, 1),)), ROW, True),  # two of three
    (Description((Ref(colour="green"), Ref(colour="red")), (("left_of", 0, 1),)), ROW, False),
    (Description((Ref(colour="red"), Ref(colour="red")),), PAIR, False),  # two refs need two objects
    (Description((Ref(colour="red"), Ref(colour="red")), (("above", 0, 1),)), COLUMN, True),
    (Description((Ref(colour="red"),), count=2), COLUMN, True),  # "two red shapes"
    (Description((Ref(colour="red"),), count=2), PAIR, False),
    (Description((Ref(),), count=3), ROW, True),  # "three shapes"
    (Description((Ref(shape="circle"),), places=((0, "left"),)), PAIR, True),
    (Description((Ref(shape="circle"),), places=((0, "right"),)), PAIR, False),
])
def test_the_truth_of_hand_made_descriptions(claim: Description, scene: Scene, true: bool) -> None:
    assert holds(claim, scene) is true


def test_phrases_read_as_english() -> None:
    assert phrase(Ref("small", "orange", "cross")) == "a small orange cross"
    assert phrase(Ref(colour="orange")) == "an orange shape"
    assert phrase(Ref(shape="cross"), 2) == "two crosses" and phrase(Ref(colour="red"), 3) == "three red shapes"


def test_every_description_is_true_of_its_scene_and_each_kind_is_written() -> None:
    seen: dict[str, int] = dict.fromkeys(KINDS, 0)
    for index in range(300):
        first, second = scene_pair(7, index)
        rng = np.random.default_rng(index)
        for kind in (k for k in KINDS if allowed(first.scene, k)):
            written = describe(first.scene, rng, kind)
            assert written.kind == kind and written.text.strip()
            assert holds(written.claim, first.scene), (written.text, first.scene)
            seen[kind] += 1
    assert all(count >= 30 for count in seen.values()), seen


def test_descriptions_are_deterministic_and_refuse_a_kind_the_scene_cannot_have() -> None:
    scene = scene_pair(3, 0)[0].scene
    texts = [describe(scene, np.random.default_rng(5)).text for _ in range(2)]
    assert texts[0] == texts[1]
    single = Scene((RED_CIRCLE,), "single")
    with pytest.raises(ValueError, match="two_of_three"):
        describe(single, np.random.default_rng(0), "two_of_three")


def test_a_caption_claims_its_whole_scene() -> None:
    claim = caption_claim(ROW)
    assert holds(claim, ROW) and not holds(claim, PAIR)
    assert holds(caption_claim(PAIR), ROW)  # the pair is in the row, in the same order
    assert all(mention_order(text, caption_claim(ROW)) is not None for text in captions(ROW))
    assert mention_order(captions(ROW)[1], claim) == [2, 1, 0]  # "c, b and a from right to left"


def test_grounding_names_the_objects_only_when_one_choice_is_true() -> None:
    left = Description((Ref(colour="red"), Ref(shape="square")), (("left_of", 0, 1),))
    assert grounding(left, PAIR) == (RED_CIRCLE, BLUE_SQUARE)
    assert grounding(Description((Ref(colour="red"),)), COLUMN) is None  # either red object
    assert grounding(Description((Ref(colour="red"), Ref(colour="red")), (("above", 0, 1),)), COLUMN) is not None
    assert grounding(Description((Ref(colour="red"),), count=2), COLUMN) is None  # a count names no object
    assert grounding(Description((Ref(colour="green"),)), PAIR) is None  # false


def test_mention_order_follows_the_text_and_gives_up_on_twins() -> None:
    claim = Description((Ref(colour="red"), Ref(shape="square")), (("left_of", 0, 1),))
    assert mention_order("A square to the right of a red shape.", claim) == [1, 0]
    assert mention_order("a red shape left of a square", claim) == [0, 1]
    assert mention_order("a square", claim) is None
    assert mention_order("a red shape above a red shape", Description((Ref(colour="red"), Ref(colour="red")))) is None


def test_example_queries_name_colours_and_differ() -> None:
    examples = example_queries()
    assert examples == example_queries() and len(set(examples)) == len(examples) == 5
    colours = set(VOCABULARY["colours"])
    assert all(colours & set(text.split()) for text in examples)
    assert any(relation in examples[-1] for relation in VOCABULARY["relations"])  # the last relates two objects
