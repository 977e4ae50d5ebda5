"""``Monitoring``: the one object the composition root hands the core for telemetry.

It is built from API providers (``opentelemetry.metrics.MeterProvider``,
``opentelemetry.trace.TracerProvider``) and, optionally, where local
histograms go (``HistogramFactory``); which SDK and exporters stand behind
them is decided at start-up by the edge. Any part can be off: without a meter
provider the drift report and feedback still work, without a tracer no span is
opened, and with everything off the edge passes no ``Monitoring`` at all.
"""

from __future__ import annotations

from opentelemetry.metrics import Meter, MeterProvider
from opentelemetry.trace import Tracer, TracerProvider

from server import __version__
from server.config import Settings
from server.core.monitoring.histogram import HistogramFactory
from server.core.monitoring.metrics import Attributes, ServingMetrics, register_monitoring
from server.core.monitoring.worker import MonitoringWorker
from server.core.registry import ExecutionObserver, ModelRegistry
from server.core.service import Observer
from server.core.store import SharedStore

SCOPE = "sluice"


class Monitoring:
    """Serving metrics, the drift/feedback worker and the tracer, started and closed together."""

    def __init__(
        self,
        settings: Settings,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        histograms: HistogramFactory | None = None,
    ) -> None:
        meter = meter_provider.get_meter(SCOPE, __version__) if meter_provider else None
        self.meter: Meter | None = meter
        self.metrics = ServingMetrics(meter, histograms) if meter is not None else None
        self.worker: MonitoringWorker | None = None
        if settings.drift.enabled or settings.feedback.enabled:
            attributes = self.metrics.attributes if self.metrics else _attributes
            self.worker = MonitoringWorker(settings.drift, settings.feedback, attributes)
            if meter is not None:
                register_monitoring(meter, self.worker)
        self.tracer: Tracer | None = (
            tracer_provider.get_tracer(SCOPE, __version__) if tracer_provider else None
        )

    @property
    def observers(self) -> tuple[Observer, ...]:
        return (self.worker,) if self.worker is not None else ()

    @property
    def executions(self) -> tuple[ExecutionObserver, ...]:
        return (self.metrics,) if self.metrics is not None else ()

    def start(self, registry: ModelRegistry, store: SharedStore | None = None) -> None:
        if self.metrics is not None:
            self.metrics.attach(registry, store)
        if self.worker is not None:
            self.worker.start()

    async def close(self) -> None:
        """Drain the worker; call after the registry has finished its last batch."""
        if self.worker is not None:
            await self.worker.close()


def _attributes(name: str, version: int) -> Attributes:
    return {"model": name, "version": str(version)}
