"""Properties of request validation: any JSON either validates into a well-formed query or is refused
with a ValidationError (a 422), never anything else; text normalisation keys equal texts equally."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.names import TIER_NAME, normalise_text, result_key, text_key
from service.pipeline.query import decode_base64
from service.pipeline.stages import BadQuery
from service.schemas import SearchRequest

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["text", "image", "embedding", "k", "rerank", "rerank_k", "min_similarity", "index"])
REQUESTS = st.dictionaries(FIELDS, JSON, max_size=6) | st.fixed_dictionaries(
    {"text": st.text(min_size=1, max_size=50)},
    optional={"k": st.integers(-5, 2000),
              "rerank": st.sampled_from(["none", "mid", "early", "blip", "late", "", "Mid", "a/b"]),
              "rerank_k": st.integers(-5, 400), "min_similarity": st.floats(-2, 2, allow_nan=False)})


@settings(max_examples=500, deadline=None)
@given(body=REQUESTS)
def test_any_body_validates_into_one_query_or_is_refused(body: dict[str, Any]) -> None:
    try:
        request = SearchRequest.model_validate(body)
    except ValidationError as exc:
        assert exc.errors()  # a message for the 422, never another exception type
        return
    given = [name for name in ("text", "image", "embedding") if getattr(request, name) is not None]
    assert len(given) == 1
    assert 1 <= request.k <= 1000 and (request.rerank_k is None or 1 <= request.rerank_k <= 256)
    # a tier's name (which tiers are loaded is the pipeline's to check: 422 for any other)
    assert request.rerank is None or re.fullmatch(TIER_NAME, request.rerank)
    assert request.text is None or 1 <= len(request.text) <= 1000


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_base64_round_trips_and_garbage_is_a_bad_query(data: bytes) -> None:
    encoded = base64.b64encode(data).decode()
    assert decode_base64(encoded) == data
    assert decode_base64(f"data:image/png;base64,{encoded}") == data
    if encoded:
        with pytest.raises(BadQuery, match="base64"):
            decode_base64(encoded[:-1] + "!")


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8),
                      min_size=1, max_size=6),
       spaces=st.lists(st.sampled_from([" ", "  ", "\t", "\n"]), min_size=7, max_size=7))
def test_texts_that_differ_in_case_and_spacing_share_one_cache_key(words: list[str], spaces: list[str]) -> None:
    plain = " ".join(words)
    messy = spaces[0] + "".join(w.upper() + spaces[i + 1] for i, w in enumerate(words))
    assert normalise_text(normalise_text(messy)) == normalise_text(messy)  # idempotent
    assert text_key("m", plain) == text_key("m", messy)
    assert text_key("m", plain) != text_key("other-model", plain)
    assert text_key("m", "caf\u00e9 " + plain) == text_key("m", "cafe\u0301 " + plain)  # NFC: one é either way


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(FIELDS, st.integers() | st.text(max_size=5), max_size=5))
def test_result_keys_ignore_key_order_but_not_the_version(body: dict[str, Any]) -> None:
    reordered = dict(reversed(list(body.items())))
    assert result_key("m", "v1", body) == result_key("m", "v1", reordered)
    assert result_key("m", "v1", body) != result_key("m", "v2", body)
