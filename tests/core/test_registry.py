"""Loading a repository: broken models are isolated, versions follow the policy."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from factory import onnx_config, train_xgboost, write_yaml, xgboost_config

from server.core.catalog import VersionState
from server.core.dataplane import DataPlane
from server.core.registry import ModelRegistry, ModelVersion
from server.core.repository import ModelRepository
from server.core.routing import Router
from server.core.service import InferenceService
from server.errors import ModelNotFound, ModelNotReady


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root)
    return root


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown()


async def load(root: Path, executor: ThreadPoolExecutor) -> ModelRegistry:
    registry = ModelRegistry(ModelRepository(root), executor, router=Router())
    await registry.load_all()
    return registry


def resolve(registry: ModelRegistry, name: str, version: int | None = None) -> ModelVersion:
    """The version the router sends a request for ``name`` (at ``version``) to."""
    return registry.router.choose(name, version).serving


async def test_all_versions_load_with_digests(repo: Path, executor: ThreadPoolExecutor) -> None:
    registry = await load(repo, executor)
    assert sorted(registry.models) == ["linear", "tree"]
    mv = resolve(registry, "tree")
    assert mv.version == 2, "the unversioned route goes to the highest ready version"
    artifact = repo / "tree" / "2" / "model.ubj"
    assert mv.sha256 == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert resolve(registry, "linear", 1).platform == "onnxruntime_onnx"
    await registry.close()


async def test_broken_model_yaml_does_not_take_down_others(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    (repo / "tree" / "model.yaml").write_text("inputs: [{name: x, datatype: FP99, shape: [1]}]")
    registry = await load(repo, executor)
    assert resolve(registry, "linear").state is VersionState.READY
    entry = registry.models["tree"]
    assert "model.yaml" in entry.error
    assert "inputs.0.datatype" in entry.error
    with pytest.raises(ModelNotReady, match=r"FP99|datatype"):
        resolve(registry, "tree")
    assert registry.is_ready()
    assert not registry.is_ready(strict=True)
    await registry.close()


async def test_corrupt_artifact_marks_only_that_version(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    (repo / "tree" / "2" / "model.ubj").write_bytes(b"not a model")
    registry = await load(repo, executor)
    broken = registry.models["tree"].versions[2]
    assert broken.state is VersionState.UNAVAILABLE
    assert "cannot load XGBoost model" in broken.reason
    assert resolve(registry, "tree").version == 1, "falls back to the ready version"
    with pytest.raises(ModelNotReady, match="version 2 is not ready"):
        resolve(registry, "tree", 2)
    await registry.close()


async def test_signature_mismatch_is_reported(repo: Path, executor: ThreadPoolExecutor) -> None:
    doc = xgboost_config()
    doc["inputs"][0]["shape"] = [-1, 7]
    doc["inputs"][0]["feature_names"] = [f"g{i}" for i in range(7)]
    write_yaml(repo / "tree" / "model.yaml", doc)
    registry = await load(repo, executor)
    reason = registry.models["tree"].versions[1].reason
    assert "declares 7 features but the booster was trained on 4" in reason
    await registry.close()


async def test_runtime_inferred_and_conflicts_reported(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    doc = xgboost_config()
    del doc["runtime"]
    write_yaml(repo / "tree" / "model.yaml", doc)
    write_yaml(repo / "linear" / "model.yaml", onnx_config(runtime="xgboost"))
    registry = await load(repo, executor)
    assert resolve(registry, "tree").platform == "xgboost_ubj"
    assert "model.yaml says runtime 'xgboost'" in registry.models["linear"].versions[1].reason
    await registry.close()


async def test_version_policy_latest_and_specific(repo: Path, executor: ThreadPoolExecutor) -> None:
    train_xgboost(repo / "tree" / "3", seed=3)
    write_yaml(repo / "tree" / "model.yaml", xgboost_config(version_policy={"latest": 2}))
    write_yaml(repo / "linear" / "model.yaml", onnx_config(version_policy={"specific": [1]}))
    registry = await load(repo, executor)
    assert sorted(registry.models["tree"].versions) == [2, 3]
    assert sorted(registry.models["linear"].versions) == [1]
    with pytest.raises(ModelNotFound, match="served versions: 1"):
        resolve(registry, "linear", 2)
    await registry.close()


async def test_pickle_artifacts_are_never_loaded(repo: Path, executor: ThreadPoolExecutor) -> None:
    version = repo / "tree" / "2"
    (version / "model.ubj").rename(version / "model.pkl")
    registry = await load(repo, executor)
    assert "no model artifact" in registry.models["tree"].versions[2].reason
    await registry.close()


async def test_unload_and_reload(repo: Path, executor: ThreadPoolExecutor) -> None:
    registry = await load(repo, executor)
    await registry.unload("tree")
    with pytest.raises(ModelNotReady):
        resolve(registry, "tree")
    assert registry.is_ready(), "an unloaded model does not make the server unready"
    await registry.load("tree")
    assert resolve(registry, "tree").state is VersionState.READY
    with pytest.raises(ModelNotFound):
        await registry.load("nope")
    await registry.close()


async def test_a_json_booster_reports_its_own_platform(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    import xgboost as xgb

    version = repo / "tree" / "2"
    xgb.Booster(model_file=str(version / "model.ubj")).save_model(str(version / "model.json"))
    (version / "model.ubj").unlink()
    (repo / "tree" / "3").mkdir()
    (repo / "tree" / "3" / "model.json").write_text("{not json")
    write_yaml(repo / "tree" / "model.yaml", xgboost_config(version_policy={"all": True}))
    registry = await load(repo, executor)
    assert resolve(registry, "tree", 2).platform == "xgboost_json"
    assert resolve(registry, "tree", 1).platform == "xgboost_ubj"
    plane = DataPlane(registry, InferenceService())
    broken = next(v for v in plane.model("tree").versions if v.version == 3)
    assert broken.platform == "xgboost_json", "named from the artifact even when it fails to load"
    assert not broken.ready
    await registry.close()
