"""Build the example repository: ``python -m models.train --repository models``.

Every requested version is rebuilt from scratch, never skipped: each is
trained, its folder written under a temporary name next to the final one and
then swapped in, so a server reading the repository never sees half a version.
One line is printed per version built.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models import churn, fraud
from models.common import (
    Contract,
    ContractError,
    Dataset,
    Recipe,
    build_reference,
    card_bytes,
    card_document,
    holdout_metrics,
    load_contract,
    reference_bytes,
    sha256_file,
    write_holdout,
)

RECIPES: dict[str, Recipe] = {"fraud": fraud.RECIPE, "churn": churn.RECIPE}


@dataclass(frozen=True, slots=True)
class Built:
    """One version folder, written."""

    model: str
    version: int
    path: Path
    metrics: dict[str, float]
    seconds: float


def generate(recipe: Recipe, contract: Contract) -> tuple[Dataset, Dataset]:
    """The recipe's seeded data in contract feature order, split into train and holdout."""
    columns, labels = recipe.generate(recipe.rows, recipe.seed)
    return Dataset.from_columns(columns, labels, contract.features).split(recipe.holdout_rows)


def build_version(
    recipe: Recipe, contract: Contract, version: int, splits: tuple[Dataset, Dataset], root: Path
) -> Built:
    """Train ``version`` and (re)place ``root/<model>/<version>/`` with its files."""
    started = time.perf_counter()
    train, holdout = splits
    trained = recipe.fit(version, train, holdout, contract)
    undeclared = sorted(set(trained.train_outputs) - set(contract.outputs))
    if undeclared:
        raise ContractError(f"{recipe.name}: outputs {undeclared} are not in model.yaml")
    metrics = holdout_metrics(trained.holdout_scores, holdout.labels)
    reference = build_reference(contract, version, train, trained.train_outputs)

    model_dir = root / recipe.name
    # A dotted name is not a version folder, so neither the server nor .gitignore's
    # ``models/*/[0-9]*/`` pattern picks up a build that is still being written.
    staging = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=model_dir))
    # mkdtemp makes the folder private; a server running as another user must read it.
    staging.chmod(0o755)
    target = model_dir / str(version)
    try:
        (staging / recipe.artifact).write_bytes(trained.artifact)
        write_holdout(staging / "holdout.parquet", holdout, contract.features)
        (staging / "reference.json").write_bytes(reference_bytes(reference))
        files = {
            name: sha256_file(staging / name)
            for name in (recipe.artifact, "holdout.parquet", "reference.json")
        }
        card = card_document(recipe, version, contract, splits, trained, metrics, files)
        (staging / "card.yaml").write_bytes(card_bytes(card))
        _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Built(recipe.name, version, target, metrics, time.perf_counter() - started)


def _replace(staging: Path, target: Path) -> None:
    """Swap ``staging`` in for ``target``; the old folder is renamed away, then deleted."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        target.rename(retired / target.name)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)


def build(root: Path, models: Sequence[str], version: int | None = None) -> list[Built]:
    """Build the requested versions of ``models`` (all versions when ``version`` is None)."""
    built: list[Built] = []
    for name in models:
        recipe = RECIPES[name]
        versions = sorted(recipe.versions) if version is None else [version]
        unknown = [v for v in versions if v not in recipe.versions]
        if unknown:
            raise ContractError(
                f"{name}: no recipe for version {unknown[0]}; known: {sorted(recipe.versions)}"
            )
        contract = load_contract(root / name)
        splits = generate(recipe, contract)
        for v in versions:
            result = build_version(recipe, contract, v, splits, root)
            print(
                f"{result.model} v{result.version}: auc={result.metrics['auc']:.4f} "
                f"log_loss={result.metrics['log_loss']:.4f} -> {result.path} "
                f"({result.seconds:.1f}s)",
                flush=True,
            )
            built.append(result)
    return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.train",
        description="Train the example models into their version folders (always rebuilds).",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="repository root holding <model>/model.yaml (default: models)",
    )
    parser.add_argument("--model", choices=sorted(RECIPES), help="build only this model")
    parser.add_argument("--version", type=int, help="build only this version")
    args = parser.parse_args(argv)
    models = [args.model] if args.model else list(RECIPES)
    try:
        build(args.repository, models, args.version)
    except (ContractError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
