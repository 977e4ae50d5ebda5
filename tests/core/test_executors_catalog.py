"""What a user is told about executors: the data plane's views and ``sluice models list``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from server.core.stack import open_dataplane
from server.models_cli import describe_repository


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fraud v2 twice: as shipped, and with a tolerance its compiled form cannot meet."""
    root = tmp_path_factory.mktemp("executors")
    for name, tolerance in (("fraud", None), ("strict", 0)):
        (root / name).mkdir()
        shutil.copytree(example_repo / "fraud" / "2", root / name / "2")
        doc = yaml.safe_load((example_repo / "fraud" / "model.yaml").read_text())
        doc["version_policy"] = {"latest": 1}
        if tolerance is not None:
            doc["runtime_options"]["parity_tolerance"] = tolerance
        (root / name / "model.yaml").write_text(yaml.safe_dump(doc))
    return root


async def test_version_info_names_the_executors_and_the_switch(repo: Path) -> None:
    async with open_dataplane(Settings(model_repository=repo)) as plane:
        fraud = plane.model("fraud").chosen
        strict = plane.model("strict").chosen
    assert fraud is not None
    assert strict is not None
    assert fraud.ready
    assert fraud.executors is not None
    assert fraud.executors.names == ("compiled", "xgboost")
    assert strict.ready, "a failed parity check costs the hybrid, never the version"
    assert strict.executors is not None
    assert strict.executors.names == ("xgboost",)
    assert "parity check failed" in strict.executors.note


async def test_models_list_shows_executors_and_why_a_version_has_one(repo: Path) -> None:
    rows = {row["model"]: row for row in await describe_repository(Settings(model_repository=repo))}
    switch = rows["fraud"]["executor_detail"]["switch_rows"]
    assert rows["fraud"]["executors"] == f"compiled 1-{switch - 1}, xgboost {switch}+"
    assert rows["fraud"]["executor_detail"]["timings_us"]
    assert rows["strict"]["executors"] == "xgboost"
    assert "parity check failed" in rows["strict"]["executor_detail"]["note"]
