"""Start-up choices (exporters, resource, sampler, settings) and the serving instruments."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision
from opentelemetry.trace import Link, SpanContext, TraceFlags

from server import __version__
from server.config import ConfigError, Settings, TelemetrySettings, load_settings
from server.core.dispatch import BatchRecord
from server.core.monitoring.metrics import ServingMetrics
from server.core.stats import VersionStats
from server.telemetry import (
    LinkAwareSampler,
    TelemetryError,
    build_telemetry,
    metric_exporters,
    service_resource,
)


def test_core_monitoring_imports_without_starlette() -> None:
    code = (
        "import sys; import server.core.monitoring.hub, server.core.monitoring.drift, "
        "server.telemetry; print('starlette' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_nested_settings_from_environment_and_file(tmp_path: Any) -> None:
    config = tmp_path / "sluice.yaml"
    config.write_text("drift:\n  psi_alert: 0.4\n  windows: 8\ntelemetry:\n  tracing: true\n")
    settings = load_settings(
        config,
        environ={"SLUICE_DRIFT__WINDOWS": "2", "SLUICE_FEEDBACK": "false"},
    )
    assert settings.drift.psi_alert == 0.4
    assert settings.drift.windows == 2  # the environment wins over the file, key by key
    assert settings.telemetry.tracing
    assert not settings.feedback.enabled
    assert not load_settings(environ={"SLUICE_TELEMETRY": "false"}).telemetry.enabled


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SLUICE_DRIFT__PSI_ALERT": "high"}, "'drift.psi_alert' (from environment variable"),
        ({"SLUICE_DRIFT__PSI_WARN": "0.5"}, "psi_warn 0.5 exceeds psi_alert 0.25"),
        ({"SLUICE_TELEMETRY__COLOUR": "red"}, "unknown setting 'telemetry.colour'"),
    ],
)
def test_bad_nested_setting_names_field_and_source(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(environ=environ)


def test_service_name_and_version_defaults_and_otel_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    resource = service_resource(TelemetrySettings(service_name="fraud-api"))
    assert resource.attributes["service.name"] == "fraud-api"
    assert resource.attributes["service.version"] == __version__
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert service_resource(TelemetrySettings()).attributes["service.name"] == "from-env"


def test_exporter_choice() -> None:
    config = TelemetrySettings()
    assert metric_exporters(config, {}) == {"prometheus"}
    assert metric_exporters(config, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == {
        "prometheus",
        "otlp",
    }
    assert metric_exporters(TelemetrySettings(otlp_endpoint="http://c:4318"), {}) == {
        "prometheus",
        "otlp",
    }
    assert metric_exporters(config, {"OTEL_METRICS_EXPORTER": "none"}) == set()
    assert metric_exporters(TelemetrySettings(prometheus=False), {}) == set()


def test_sdk_disabled_keeps_drift_and_feedback() -> None:
    telemetry = build_telemetry(Settings(), {"OTEL_SDK_DISABLED": "true"})
    assert telemetry.prometheus is None
    assert telemetry.monitoring is not None
    assert telemetry.monitoring.worker is not None
    assert telemetry.monitoring.metrics is None


def test_unsupported_protocol_is_a_clear_error() -> None:
    settings = Settings(telemetry=TelemetrySettings(otlp_endpoint="http://c:4318"))
    with pytest.raises(TelemetryError, match="http/json"):
        build_telemetry(settings, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def _context(sampled: bool) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id=1, span_id=2, is_remote=False, trace_flags=flags)


def test_batch_span_is_kept_when_a_request_it_served_was_sampled() -> None:
    sampler = LinkAwareSampler(ALWAYS_OFF)
    kept = sampler.should_sample(None, 5, "execute m", links=[Link(_context(True))])
    assert kept.decision is Decision.RECORD_AND_SAMPLE
    dropped = sampler.should_sample(None, 5, "execute m", links=[Link(_context(False))])
    assert dropped.decision is Decision.DROP


def test_serving_metrics_read_stats_and_record_batches() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = ServingMetrics(provider.get_meter("test"))
    stats = VersionStats()
    stats.record_request(False, 1000, "Overloaded")
    stats.record_request(False, 1000, "Overloaded")
    stats.record_request(True, 2_000_000)
    mv: Any = SimpleNamespace(name="m", version=3, stats=stats, dispatcher=None)
    registry: Any = SimpleNamespace(models={"m": SimpleNamespace(versions={3: mv})})
    metrics.attach(registry)
    metrics.executed(
        mv, BatchRecord(rows=7, requests=2, queue_s=(0.001, 0.002), compute_ns=5, ok=True)
    )
    data = reader.get_metrics_data()
    points = {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    attributes = {"model": "m", "version": "3"}
    assert [p.value for p in points["ml.inference.request.rejected"]] == [2]
    failure = points["ml.inference.request.failure"][0]
    assert dict(failure.attributes) == {**attributes, "reason": "Overloaded"}
    assert failure.value == 2
    assert points["ml.inference.batch.size"][0].sum == 7
    assert points["ml.inference.compute.duration"][0].count == 1
    request_time = points["ml.inference.request.time"][0]
    assert dict(request_time.attributes) == attributes
    assert request_time.value == pytest.approx(0.002002)
    provider.shutdown()
