"""The audit log on disk: fields, rotation without loss, several writers, a full queue."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson

from server.core.governance import Action, AuditLog
from server.core.governance.audit import read_audit
from server.core.governance.jsonl import JsonLinesFile, LineWriter, rotated_files


def test_a_record_names_time_actor_action_model_version_reason_and_figures(
    tmp_path: Path,
) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", rotate_bytes=1 << 20)
    log.record(
        Action.ROLLBACK,
        "fraud",
        2,
        actor="analysis",
        reason="error rate 0.2 > 0.01",
        figures={"error_rate": 0.2, "requests": 600},
    )
    assert log.flush()
    log.close()
    (line,) = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    doc = orjson.loads(line)
    assert doc["action"] == "rollback"
    assert (doc["model"], doc["version"], doc["actor"]) == ("fraud", 2, "analysis")
    assert doc["reason"] == "error rate 0.2 > 0.01"
    assert doc["figures"] == {"error_rate": 0.2, "requests": 600}
    assert doc["time"].endswith("Z")
    assert doc["time"].startswith("20")
    assert isinstance(doc["ts"], float)


def test_rotation_keeps_every_record_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=2048)
    for n in range(300):
        log.record(Action.STEP, "fraud", 2, reason=f"step {n}", figures={"n": n})
    assert log.flush()
    log.close()
    files = rotated_files(path)
    assert len(files) > 5  # it did rotate
    assert all(f.stat().st_size <= 2048 for f in files)
    assert [r.figures["n"] for r in read_audit(path)] == list(range(300))


def test_two_writers_sharing_a_file_lose_nothing_across_rotations(tmp_path: Path) -> None:
    # Two logs on one path stand for two server processes: each has its own file
    # descriptors, and flock serialises them as it would across processes.
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path, rotate_bytes=4096) for _ in range(2)]

    def write(index: int) -> None:
        for n in range(200):
            logs[index].record(Action.TRAFFIC, "fraud", reason=f"w{index}", figures={"n": n})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        assert log.flush()
        log.close()
    records = list(read_audit(path))
    assert len(records) == 400
    for writer in ("w0", "w1"):
        assert [r.figures["n"] for r in records if r.reason == writer] == list(range(200))


def test_a_truncated_last_line_is_skipped_by_readers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, rotate_bytes=1 << 20)
    log.record(Action.LOAD, "fraud", 1, reason="server start")
    assert log.flush()
    log.close()
    with path.open("ab") as handle:
        handle.write(b'{"action": "unlo')  # a crash mid-write
    assert [r.action for r in read_audit(path)] == ["load"]


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    release = threading.Event()
    rendering = threading.Event()

    def render(item: int) -> bytes:
        rendering.set()
        release.wait(30)
        return b"%d\n" % item

    writer = LineWriter(
        JsonLinesFile(tmp_path / "x.jsonl", rotate_bytes=1 << 20, fsync=False),
        render,
        queue_size=3,
        per_record=True,
        name="test-writer",
    )
    assert writer.put(0)
    assert rendering.wait(30)  # the writer holds item 0; the queue is empty again
    accepted = [writer.put(n) for n in range(1, 10)]
    assert accepted == [True] * 3 + [False] * 6
    assert writer.dropped == 6
    release.set()
    assert writer.flush()
    writer.close()
    assert (tmp_path / "x.jsonl").read_bytes().split() == [b"0", b"1", b"2", b"3"]
