"""The layering the design promises, checked on the code itself.

- The core imports without the web layer and without the OpenTelemetry SDK
  (it calls only the API; the SDK is wired in at the edge).
- The HTTP edge reaches the core only through the data plane and its typed
  views: nothing under ``server/http`` imports the registry or the repository.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import server

SERVER = Path(server.__file__).parent
CORE_MODULES = sorted(
    "server." + ".".join(p.relative_to(SERVER).with_suffix("").parts)
    for p in (SERVER / "core").rglob("*.py")
    if p.name != "__init__.py"
)


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_core_and_cli_import_without_starlette() -> None:
    loaded = _loaded_after_import([*CORE_MODULES, "server.config", "server.errors"])
    assert "server.core.dataplane" in loaded, "the walk over server/core found the data plane"
    assert "starlette" not in loaded


def test_core_imports_no_opentelemetry_sdk() -> None:
    loaded = _loaded_after_import(CORE_MODULES)
    assert "opentelemetry.trace" in loaded, "the core does use the OpenTelemetry API"
    sdk = sorted(
        m for m in loaded if m == "opentelemetry.sdk" or m.startswith("opentelemetry.sdk.")
    )
    assert sdk == []


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_http_edge_never_imports_registry_or_repository() -> None:
    files = sorted((SERVER / "http").rglob("*.py"))
    assert len(files) > 5
    forbidden = ("server.core.registry", "server.core.repository")
    offenders = {
        f"{path.relative_to(SERVER)}: {module}"
        for path in files
        for module in _imports(path)
        if module.startswith(forbidden)
    }
    assert offenders == set()


def test_the_boundary_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "edge.py"
    sample.write_text("from server.core import registry\nfrom server.core.repository import X\n")
    assert {"server.core.registry", "server.core.repository"} <= _imports(sample)
