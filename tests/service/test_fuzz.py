"""Fuzzing: schemathesis drives every operation of the service's own OpenAPI schema against the real
app (lifespan, tiny models, a real index); no input may cause a 5xx or a response the schema does not
describe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.specs.openapi import checks as oa_checks

from indexer.build import BuildOptions, build_or_add
from indexer.encoder import DualEncoder
from service.app import create_app
from service.config import Settings
from training.scenes import write_scenes

API_KEY = "fuzz-key"


@pytest.fixture(scope="module")
def api_schema(encoder: DualEncoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("fuzz")
    write_scenes(root / "src", 12, seed=91, twins=True)
    build_or_add(root / "src" / "captions.jsonl", root / "idx", encoder, BuildOptions(workers=0), "build")
    settings_ = Settings(indexes=[f"scenes={root / 'idx'}"], rerankers=["mid"], api_key=API_KEY,
                         job_roots=[str(root / "src")], max_body_bytes=300_000)
    app = create_app(settings_)
    with TestClient(app):  # runs the lifespan: the engine stays loaded while the module's cases run
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        rejected = schema.config.checks.negative_data_rejection  # a body over max_body_bytes is refused by its 413
        rejected.expected_statuses = [*rejected.expected_statuses, "413"]
        yield schema


# what "never a 5xx, never off-schema" means; positive_data_acceptance is left out on purpose: the
# schema cannot say that `image` must decode to an image or `text` must hold a word, and those 422s are right
CHECKS = [st_checks.not_a_server_error, oa_checks.status_code_conformance, oa_checks.content_type_conformance,
          oa_checks.response_schema_conformance, oa_checks.negative_data_rejection]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_5xx_or_an_off_schema_answer(api_schema: Any, mode: GenerationMode) -> None:
    # schemathesis' own pytest plugin does not load a schema from a fixture under pytest 9, so each
    # operation's strategy is driven by hypothesis here
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/search", "/v1/search/image", "/knn-service", "/v1/jobs/index"}
    no_invalid_input = []  # e.g. a free-form string path parameter: every value is valid
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, operation.label
            no_invalid_input.append(operation.path)
    assert not {"/v1/search", "/knn-service", "/v1/jobs/index"} & set(no_invalid_input)
