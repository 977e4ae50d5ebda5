"""The ``sluice`` command line as a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import start_server, stop_server

SLUICE = [sys.executable, "-m", "server"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SLUICE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "99999"], {}, "invalid setting 'port' (from flag --port)"),
        ([], {"SLUICE_PORT": "eighty"}, "(from environment variable SLUICE_PORT)"),
        ([], {"SLUICE_INFERENCE_THREADS": "0"}, "invalid setting 'inference_threads'"),
        ([], {"SLUICE_NO_SUCH_THING": "1"}, "unknown setting 'no_such_thing'"),
    ],
)
def test_bad_settings_are_one_line_errors_with_exit_2(
    tiny_repo: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    result = run("serve", "--model-repository", str(tiny_repo), *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_config_file_errors_name_the_file(tiny_repo: Path, tmp_path: Path) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("port: 8081\nbatchin: true\n")
    result = run("serve", "--config", str(config), "--model-repository", str(tiny_repo))
    assert result.returncode == 2
    assert f"unknown setting 'batchin' (from {config})" in result.stderr


def test_flags_override_environment_override_file(tmp_path: Path) -> None:
    from server.config import load_settings

    config = tmp_path / "sluice.yaml"
    config.write_text("port: 7000\nhost: 127.0.0.2\nbatching: false\n")
    settings = load_settings(
        config, {"SLUICE_PORT": "7001", "SLUICE_HOST": "127.0.0.3"}, {"port": 7002}
    )
    assert (settings.port, settings.host, settings.batching) == (7002, "127.0.0.3", False)


def test_missing_repository_is_a_usage_error(tmp_path: Path) -> None:
    result = run("serve", "--model-repository", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_models_list_shows_versions_runtimes_and_digests(tiny_repo: Path) -> None:
    table = run("models", "list", "--model-repository", str(tiny_repo))
    assert table.returncode == 0, table.stderr
    for word in ("tree", "linear", "xgboost", "onnx", "READY"):
        assert word in table.stdout
    rows = orjson.loads(
        run("models", "list", "--model-repository", str(tiny_repo), "--json").stdout
    )
    assert {(r["model"], r["version"]) for r in rows} == {
        ("tree", "1"),
        ("tree", "2"),
        ("linear", "1"),
        ("linear", "2"),
    }
    assert all(len(r["sha256"]) == 64 for r in rows)


def test_models_list_reports_a_broken_model(tiny_repo: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    (repo / "tree" / "1" / "model.ubj").write_bytes(b"garbage")
    result = run("models", "list", "--model-repository", str(repo), "--json")
    assert result.returncode == 1, "a broken version makes the listing fail"
    rows = {(r["model"], r["version"]): r for r in orjson.loads(result.stdout)}
    assert rows[("tree", "1")]["state"] == "UNAVAILABLE"
    assert "cannot load XGBoost model" in rows[("tree", "1")]["reason"]
    assert rows[("tree", "2")]["state"] == "READY"


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_sigterm_finishes_in_flight_requests(tiny_repo: Path, tmp_path: Path) -> None:
    server = start_server(tiny_repo, tmp_path / "server.log")
    try:
        rows = np.random.default_rng(0).normal(size=(300_000, 4)).astype(np.float32)
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "features",
                        "datatype": "FP32",
                        "shape": list(rows.shape),
                        "data": rows.reshape(-1).tolist(),
                    }
                ]
            }
        )
        request = (
            f"POST /v2/models/tree/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
        ).encode() + body
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        ticks = _cpu_ticks(server.process.pid)
        sock.sendall(request)
        deadline = time.monotonic() + 30
        # The server is busy with our request once it has burnt CPU on it.
        while _cpu_ticks(server.process.pid) < ticks + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        response = b""
        while chunk := sock.recv(1 << 20):
            response += chunk
        sock.close()
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        doc = orjson.loads(payload)
        assert doc["outputs"][0]["shape"] == [300_000]
        # uvicorn re-raises SIGTERM after its graceful shutdown, as a supervisor expects.
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log.read_text()
    finally:
        stop_server(server)
