"""Reading wrk's report: the figures the harness is compared with."""

from __future__ import annotations

import pytest

from loadtest.benchmarks.wrk_check import WrkFailed, parse_wrk

REPORT = """Running 6s test @ http://127.0.0.1:8341/v2/models/fraud/infer
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.62ms    1.10ms  21.03ms   88.61%
    Req/Sec    17.66k     1.02k   19.12k    71.67%
  Latency Distribution
     50%  {p50}
     75%    3.90ms
     90%    4.61ms
     99%  {p99}
  105144 requests in 6.00s, 22.66MB read
{extra}Requests/sec:  17521.40
Transfer/sec:      3.78MB
"""


def test_rate_and_percentiles_in_milliseconds_whatever_the_unit() -> None:
    result = parse_wrk(REPORT.format(p50="812.00us", p99="1.20s", extra=""))
    assert result.rps == pytest.approx(17521.40)
    assert result.p50_ms == pytest.approx(0.812)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.non_2xx == 0
    assert result.socket_errors is None


def test_failed_requests_are_reported() -> None:
    extra = (
        "  Socket errors: connect 0, read 3, write 0, timeout 2\n  Non-2xx or 3xx responses: 17\n"
    )
    result = parse_wrk(REPORT.format(p50="3.45ms", p99="6.91ms", extra=extra))
    assert result.non_2xx == 17
    assert result.socket_errors == "connect 0, read 3, write 0, timeout 2"


def test_a_report_without_a_rate_is_an_error_that_shows_it() -> None:
    with pytest.raises(WrkFailed, match="unable to connect"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
