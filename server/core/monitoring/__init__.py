"""Monitoring: OpenTelemetry instruments, data and prediction drift, feedback and quality.

Modules import only the OpenTelemetry API; the SDK and exporters are set up by
the edge at start-up (``server.telemetry``). ``hub.Monitoring`` composes them.
This file stays empty so the batcher can import ``tracing`` without cycles.
"""
