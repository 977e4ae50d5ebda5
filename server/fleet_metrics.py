"""One Prometheus scrape that accounts for every worker of ``sluice serve --workers N``.

The workers share one port, so a scrape reaches whichever worker the kernel
picks. Each worker therefore also serves its own exposition on a private Unix
socket in the supervisor's run directory, and ``/metrics`` on any worker
returns every worker's series, each labelled ``service_instance_id`` (the
worker's ``service.instance.id``). Sum over that label for the server's
totals: ``sum without (service_instance_id) (rate(ml_inference_count_total[1m]))``.
A sibling that does not answer within the timeout is left out of that scrape
(and ``sluice_fleet_workers_scraped`` says how many answered).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("sluice.fleet_metrics")

LABEL = "service_instance_id"
TIMEOUT_S = 2.0
_SUFFIX = ".metrics.sock"


class FleetMetrics:
    """This worker's share of the fleet scrape: its socket server and the merging collector."""

    def __init__(self, local: CollectorRegistry, instance: str, fleet_dir: Path) -> None:
        self._local = local
        self._instance = instance
        self._dir = fleet_dir
        self._path = fleet_dir / f"{_safe(instance)}{_SUFFIX}"
        self._names: dict[Path, str] = {}
        self._server = _ExpositionServer(str(self._path), local)
        (fleet_dir / f"{_safe(instance)}.name").write_text(instance)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sluice-fleet-metrics", daemon=True
        )
        self._thread.start()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Every worker's families, one per name, each sample labelled with its worker."""
        sources: list[tuple[str, Iterable[Metric]]] = [(self._instance, self._local.collect())]
        for path in sorted(self._dir.glob(f"*{_SUFFIX}")):
            if path == self._path:
                continue
            text = _fetch(path)
            if text is not None:
                sources.append((self._sibling(path), text_string_to_metric_families(text)))
        merged: dict[tuple[str, str], Metric] = {}
        for instance, families in sources:
            for family in families:
                key = (family.name, family.type)
                into = merged.get(key)
                if into is None:
                    into = merged[key] = Metric(family.name, family.documentation, family.type)
                into.samples += [_labelled(s, instance) for s in family.samples]
        scraped = GaugeMetricFamily(
            "sluice_fleet_workers_scraped", "Workers whose metrics this scrape includes"
        )
        scraped.add_metric([], len(sources))
        yield scraped
        yield from merged.values()

    def _sibling(self, path: Path) -> str:
        name = self._names.get(path)
        if name is None:
            stem = path.name.removesuffix(_SUFFIX)
            marker = self._dir / f"{stem}.name"
            name = marker.read_text() if marker.is_file() else stem
            self._names[path] = name
        return name

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._path.unlink(missing_ok=True)
        (self._dir / f"{_safe(self._instance)}.name").unlink(missing_ok=True)


class _ExpositionServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, registry: CollectorRegistry) -> None:
        self.registry = registry
        Path(path).unlink(missing_ok=True)  # left by a worker that was killed
        super().__init__(path, _ExpositionHandler)


class _ExpositionHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _ExpositionServer)
        self.wfile.write(generate_latest(server.registry))


def _fetch(path: Path) -> str | None:
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT_S)
            sock.connect(str(path))
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        log.debug("worker metrics at %s unavailable: %s", path, exc)
        return None
    return b"".join(chunks).decode()


def _labelled(sample: Sample, instance: str) -> Sample:
    if LABEL in sample.labels:
        return sample
    return sample._replace(labels={**sample.labels, LABEL: instance})


def _safe(instance: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in instance)
