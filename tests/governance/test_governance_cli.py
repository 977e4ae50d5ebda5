"""``sluice models show`` and ``history`` on a small repository, in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.__main__ import main
from server.core.governance import Action, AuditLog

CARD = """\
description: second tree
trained_at: '2026-11-30T12:00:00Z'
code_revision: abc123
data: {sha256: d4t4d1g3st, holdout_sha256: h0ld0ut}
metrics: {holdout: {auc: 0.91}}
approved_by: model-risk-board
"""


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    root = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    (root / "tree" / "2" / "card.yaml").write_text(CARD)
    return root


def test_show_prints_card_digest_approval_and_traffic(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "show", "tree:2", "--model-repository", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out
    assert "version 1" not in out
    for text in ("2026-11-30T12:00:00Z", "abc123", "d4t4d1g3st", "h0ld0ut", "0.91"):
        assert text in out
    assert "approved by model-risk-board" in out
    assert "traffic:" in out
    assert len([w for w in out.split() if len(w) == 64]) == 1  # the artifact sha256


def test_approve_then_show_names_the_approver(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--model-repository", str(repo)]
    assert main(["models", "approve", "tree:1", "--actor", "dana", "--reason", "ok", *where]) == 0
    capsys.readouterr()
    assert main(["models", "show", "tree", *where]) == 0
    out = capsys.readouterr().out
    assert "approved by dana" in out
    assert "approved by model-risk-board" in out
    assert main(["models", "approve", "tree", "--actor", "d", "--reason", "r", *where]) == 1
    assert "NAME:VERSION" in capsys.readouterr().err


def test_history_filters_the_audit_trail_by_model_and_time(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AuditLog(repo / ".sluice" / "audit.jsonl", rotate_bytes=1 << 20)
    log.record(Action.LOAD, "tree", 1, reason="server start")
    log.record(Action.LOAD, "linear", 1, reason="server start")
    assert log.flush()
    log.close()
    where = ["--model-repository", str(repo)]
    assert main(["models", "history", "tree", *where]) == 0
    out = capsys.readouterr().out
    assert "tree v1" in out
    assert "linear" not in out
    assert main(["models", "history", "tree", "--since", "2999-01-01T00:00:00Z", *where]) == 0
    assert "tree" not in capsys.readouterr().out
    assert main(["models", "history", "tree", "--request-id", "x", *where]) == 1
    assert "prediction log is off" in capsys.readouterr().err
