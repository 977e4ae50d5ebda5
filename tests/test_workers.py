"""``sluice serve --workers N``: several processes on one port, one set of metrics, one SIGTERM."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families
from workers_support import Workers, scrape, start_workers

from server.__main__ import main
from server.config import load_settings
from server.fleet_metrics import LABEL, FleetMetrics
from server.workers import resolve_workers, shared_state_note, without_workers_flag

BODY = {
    "inputs": [
        {
            "name": "features",
            "datatype": "FP32",
            "shape": [1, 30],
            "data": [
                *(120.5, 23, 5, 0.7, 0.4, 350.0, 80.0, 4, 9, 20, 900.0, 60.0, 2.0, 400, 900),
                *(1, 1, 0, 0, 0.2, 0.8, 2, 1, 1, 1, 3.0, 1, 34, 0.9, 0),
            ],
        }
    ]
}


def answered(workers: Workers) -> Counter[str]:
    """Successful fraud requests per worker, from one scrape."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(scrape(workers)):
        if family.name == "ml_inference_request_success":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["model"] == "fraud":
                    counts[sample.labels[LABEL]] += int(sample.value)
    return counts


@pytest.fixture(scope="module")
def two(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    workers = start_workers(example_repo, tmp_path_factory.mktemp("workers") / "log", 2)
    yield workers
    workers.stop()


def test_two_workers_answer_on_one_port_and_the_metrics_count_both(two: Workers) -> None:
    before = answered(two)
    for _ in range(40):
        # A new connection each time: the kernel spreads connections, not requests.
        with httpx.Client(base_url=two.url, timeout=10) as client:
            response = client.post("/v2/models/fraud/infer", json=BODY)
        assert response.status_code == 200
    # Any worker's /metrics reports both; scrape a few times so more than one answers.
    for _ in range(4):
        after = answered(two)
        delta = {w: after[w] - before[w] for w in after}
        assert len(delta) == 2, delta
        assert all(n > 0 for n in delta.values()), delta
        assert sum(delta.values()) == 40
    # Without Redis the supervisor says at start what each worker keeps to itself.
    assert "per worker: the result cache, feedback joins and drift windows" in two.log.read_text()


def test_sigterm_drains_every_worker(two: Workers) -> None:
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=two.url, timeout=10) as client:
            while not stop.is_set():
                try:
                    statuses[client.post("/v2/models/fraud/infer", json=BODY).status_code] += 1
                except httpx.ConnectError:
                    return  # the server stopped accepting: expected once SIGTERM is in

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(statuses.values()) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for load to be under way, bounded
        two.process.send_signal(signal.SIGTERM)
        assert two.process.wait(60) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    log = two.log.read_text()
    assert log.count("Application shutdown complete") == 2, log[-3000:]
    assert log.count("Finished server process") == 2
    assert set(statuses) == {200}, statuses


def _self_signed(root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice-worker-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = root / "server.pem", root / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _tls_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """One request on a new TLS connection: the server's certificate (DER) and its answer."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is compared below instead
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw) as sock,
    ):
        certificate = sock.getpeercert(binary_form=True)
        assert certificate is not None
        # The server may refuse before it has read everything: its answer is what counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass  # a close after the answer, without a TLS close_notify
    return certificate, answer


def test_every_worker_serves_with_the_single_process_protocol_and_tls(
    tiny_repo: Path, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    expected = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    workers = start_workers(
        tiny_repo,
        tmp_path / "log",
        2,
        *("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
        env={"SLUICE_LIMITS__MAX_HEADER_BYTES": "8192"},
        scheme="https",
    )
    try:
        # New connections, so the kernel hands them to both workers (16 all to one worker:
        # one chance in 2**15).
        for _ in range(8):
            # Far more than one read: the limit is checked as the head arrives.
            huge = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (4 << 20)
            certificate, answer = _tls_exchange(workers.port, huge + b"\r\n\r\n")
            assert certificate == expected
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 431"), head
            assert orjson.loads(body) == {"error": "request line and headers exceed 8192 bytes"}
            _, answer = _tls_exchange(workers.port, b"NOT HTTP\r\n\r\n")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), head
            assert orjson.loads(body) == {"error": "the request is not valid HTTP/1.1"}
    finally:
        workers.stop()


def _workers_on(port: int) -> list[int]:
    """Pids of the worker processes serving ``port`` (their command lines say so)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"--worker-index" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


def test_workers_of_a_supervisor_killed_outright_stop_and_free_the_port(
    example_repo: Path, tmp_path: Path
) -> None:
    workers = start_workers(example_repo, tmp_path / "log", 2)
    try:
        assert len(_workers_on(workers.port)) == 2
        workers.process.kill()  # SIGKILL: the supervisor can stop nobody
        workers.process.wait()
        deadline = time.monotonic() + 60
        while _workers_on(workers.port) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the workers' exit, bounded by the deadline
        assert _workers_on(workers.port) == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{workers.url}/v2/health/live", timeout=5)
    finally:
        for pid in _workers_on(workers.port):
            os.kill(pid, signal.SIGKILL)


def test_the_supervisor_warns_once_about_a_public_bind_without_keys(
    tiny_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Port 0 makes the supervisor refuse before it binds or starts anything.
    argv = ["serve", "--model-repository", str(tiny_repo), "--host", "0.0.0.0"]
    with caplog.at_level(logging.WARNING, logger="sluice.security"):
        assert main([*argv, "--port", "0", "--workers", "2"]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "sluice.security"]
    assert len(warnings) == 1
    assert "WITHOUT API KEYS" in warnings[0]


def test_the_start_up_note_names_what_redis_shares_and_what_stays_per_worker() -> None:
    redis = {"redis": {"url": "redis://127.0.0.1:1"}}
    feedback_only = shared_state_note(load_settings(None, flags=redis), 3)
    assert "per worker: the result cache and drift windows" in feedback_only
    assert "shared through Redis: feedback joins" in feedback_only
    both = shared_state_note(load_settings(None, flags={**redis, "cache": {"backend": "redis"}}), 3)
    assert "per worker: drift windows;" in both
    assert "shared through Redis: the result cache and feedback joins" in both


def test_workers_auto_is_the_affinity_mask_and_bad_values_are_refused() -> None:
    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError, match="--workers"):
            resolve_workers(bad)
    argv = ["serve", "--workers", "2", "--port", "1", "--workers=3"]
    assert without_workers_flag(argv) == ["serve", "--port", "1"]


def test_one_scrape_merges_every_workers_series(tmp_path: Path) -> None:
    fleets = []
    for name, count in (("host/worker-0", 3), ("host/worker-1", 4)):
        local = CollectorRegistry()
        PromCounter("requests", "Requests", ["model"], registry=local).labels("fraud").inc(count)
        fleets.append(FleetMetrics(local, name, tmp_path))
    try:
        merged = list(fleets[0].collect())
        (requests,) = [f for f in merged if f.name == "requests"]
        totals = {s.labels[LABEL]: s.value for s in requests.samples if s.name == "requests_total"}
        assert totals == {"host/worker-0": 3.0, "host/worker-1": 4.0}
        (scraped,) = [f for f in merged if f.name == "sluice_fleet_workers_scraped"]
        assert scraped.samples[0].value == 2
    finally:
        for fleet in fleets:
            fleet.close()
    assert list(tmp_path.iterdir()) == []
