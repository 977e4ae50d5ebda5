"""schemathesis against a real ``sluice serve``: the OIP document and Sluice's own.

1. ``spec/open_inference_rest.yaml`` (a copy of ``../shared/spec``; a test keeps
   them equal), with the real model names and versions filled in and the
   versionless paths added, so the generated infer bodies reach the codec
   rather than stopping at a 404.
2. ``GET /openapi.json`` of the server itself: every route it answers.

Generated cases are valid and invalid (schemathesis' positive and negative
modes). Every answer must be: not a 5xx (except 501 for what the server
does not implement and 503 with Retry-After), and every 4xx an
``{"error": ...}`` JSON body that says something.
"""

from __future__ import annotations

import copy
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, settings
from security_support import Served, serve
from starlette.testclient import TestClient

from server.config import Settings
from server.http.app import create_app

SPEC = Path(__file__).parent / "spec" / "open_inference_rest.yaml"
SHARED = ROOT.parent / "shared" / "spec" / "open_inference_rest.yaml"
MODELS = ["tree", "linear"]
VERSIONS = ["1", "2"]
CASES_PER_OPERATION = 150
CASES: Counter[str] = Counter()  # generated cases run, per document


def _filled(raw: dict[str, Any]) -> dict[str, Any]:
    """The OIP document with real names in the paths, and each versioned path also versionless."""
    doc = copy.deepcopy(raw)
    paths: dict[str, Any] = {}
    for path, item in doc["paths"].items():
        new = path.replace("${MODEL_NAME}", "{model_name}").replace(
            "${MODEL_VERSION}", "{model_version}"
        )
        for parameter in item.get("parameters", []):
            if parameter["name"] == "MODEL_NAME":
                parameter.update(name="model_name", schema={"type": "string", "enum": MODELS})
            elif parameter["name"] == "MODEL_VERSION":
                parameter.update(name="model_version", schema={"type": "string", "enum": VERSIONS})
        paths[new] = item
        if "/versions/{model_version}" in new:
            bare = copy.deepcopy(item)
            bare["parameters"] = [p for p in bare["parameters"] if p["name"] != "model_version"]
            for operation in bare.values():
                if isinstance(operation, dict) and "operationId" in operation:
                    operation["operationId"] += "-versionless"
            paths[new.replace("/versions/{model_version}", "")] = bare
    doc["paths"] = paths
    # Inputs named as the models' are, some of the time, so that validation is reached too.
    tensor = doc["components"]["schemas"]["request_input"]["properties"]
    tensor["name"] = {"anyOf": [{"type": "string", "enum": ["features"]}, {"type": "string"}]}
    tensor["datatype"] = {
        "anyOf": [
            {"type": "string", "enum": ["FP32", "FP64", "INT64", "BOOL", "BYTES", "UINT8"]},
            {"type": "string"},
        ]
    }
    return doc


def _config() -> Any:
    return schemathesis.Config.from_dict(
        {"generation": {"max-examples": CASES_PER_OPERATION, "deterministic": False}}
    )


def own_document() -> dict[str, Any]:
    """Sluice's document as its app serves it (outside the lifespan: no models needed)."""
    answer = TestClient(create_app(Settings())).get("/openapi.json")
    assert answer.status_code == 200, answer.text
    doc: dict[str, Any] = answer.json()
    return doc


oip = schemathesis.openapi.from_dict(_filled(yaml.safe_load(SPEC.read_text())), config=_config())
sluice = schemathesis.openapi.from_dict(own_document(), config=_config())


@pytest.fixture(scope="module")
def fuzzed(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # A copy: load, unload, traffic and approvals may write beside the models.
    root = tmp_path_factory.mktemp("fuzz")
    repo = root / "repo"
    shutil.copytree(tiny_repo, repo)
    running = serve(repo, root / "server.log")
    yield running
    running.stop()


def header(response: Any, name: str) -> str:
    values = response.headers.get(name) or [""]  # schemathesis keeps every value of a header
    return str(values[0])


def check_answer(response: Any, where: str) -> None:
    status = response.status_code
    if status >= 500:
        allowed = status == 501 or (status == 503 and header(response, "retry-after"))
        assert allowed, f"{where}: {status} {response.text[:300]}"
    if 400 <= status < 600:
        assert header(response, "content-type").startswith("application/json"), where
        message = response.json().get("error")
        assert isinstance(message, str), f"{where}: {response.text[:300]}"
        assert message.strip(), f"{where}: empty error"


FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@oip.parametrize()
@FUZZ
def test_the_oip_document_finds_no_server_errors(case: Any, fuzzed: Served) -> None:
    response = case.call(base_url=fuzzed.url, timeout=30)
    CASES["oip"] += 1
    check_answer(response, f"{case.method} {case.formatted_path}")


def test_sluice_openapi_document_lists_every_route(fuzzed: Served) -> None:
    doc = httpx.get(f"{fuzzed.url}/openapi.json", timeout=10).json()
    assert doc == own_document(), "the fuzzed document is the one the server serves"
    assert doc["openapi"].startswith("3.")
    for path in (
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/repository/models/{name}/load",
        "/v2/models/{name}/feedback",
        "/metrics",
        "/openapi.json",
    ):
        assert path in doc["paths"]


@sluice.parametrize()
@FUZZ
def test_sluice_openapi_document_finds_no_server_errors(case: Any, fuzzed: Served) -> None:
    response = case.call(base_url=fuzzed.url, timeout=30)
    CASES["sluice"] += 1
    check_answer(response, f"{case.method} {case.formatted_path}")


def test_enough_cases_were_generated() -> None:
    if not CASES:
        pytest.skip("run with the fuzz tests above")
    print(f"schemathesis cases: {dict(CASES)}")  # shown with -s or -rP
    assert CASES["oip"] + CASES["sluice"] >= 2000, dict(CASES)


def test_the_oip_copy_matches_the_shared_spec() -> None:
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} is not checked out beside the repository")
    assert SPEC.read_bytes() == SHARED.read_bytes()
