"""The core must import without the web layer (DESIGN: edges are thin adapters)."""

from __future__ import annotations

import subprocess
import sys


def test_core_and_cli_import_without_starlette() -> None:
    code = (
        "import sys; import server.core.service, server.core.stack, server.core.batcher, "
        "server.core.registry, server.config, server.errors; "
        "print('starlette' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
