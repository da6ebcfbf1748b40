"""Prometheus metrics: what an operator watches while trawl runs unattended.

One registry per process (:data:`METRICS`), labelled by ``source`` and ``host``.
Hosts are capped (``TRAWL_METRICS_MAX_HOSTS``): the first N hosts seen keep
their name, the rest fold into ``other``, so a broad crawl cannot blow up the
time-series count. Exposed during a run with ``--metrics-port`` /
``TRAWL_METRICS_PORT`` and pushed to a Pushgateway at the end of a flow when
``TRAWL_PUSHGATEWAY_URL`` is set (the usual pattern for batch jobs).

Every metric name starts with ``trawl_``; ``deploy/prometheus/alerts.yml`` and
``deploy/grafana/trawl.json`` use them (a test checks the names exist).
"""

from __future__ import annotations

import threading
from typing import Final
from urllib.error import HTTPError

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

__all__ = ["BREAKER_STATES", "METRICS", "OTHER_HOST", "Metrics", "status_class"]

log = structlog.get_logger("trawl.metrics")

OTHER_HOST: Final = "other"
BREAKER_STATES: Final[dict[str, int]] = {"closed": 0, "half-open": 1, "open": 2}
"""The breaker state gauge's values (pybreaker's state names)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int | None) -> str:
    """``2xx`` … ``5xx`` for a response, ``error`` for no response (connection error, timeout, size limit)."""
    return f"{status // 100}xx" if status else "error"


class Metrics:
    """trawl's metrics in their own registry (so tests and embedders can read or replace them)."""

    def __init__(self, max_hosts: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_hosts = max_hosts
        self._hosts: set[str] = set()
        self._lock = threading.Lock()
        self._server_port: int | None = None
        r = self.registry
        self.requests = Counter(
            "trawl_requests_total",
            "HTTP requests sent (each attempt and redirect hop), by status class (error: no response).",
            ["source", "host", "status_class"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "trawl_request_duration_seconds",
            "Time from sending a request to having its whole body.",
            ["source", "host"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "trawl_requests_in_flight", "Requests sent and not yet answered.", ["source", "host"], registry=r
        )
        self.retries = Counter(
            "trawl_retries_total", "Retries of transient failures (after a backoff).", ["source", "host"], registry=r
        )
        self.host_concurrency = Gauge(
            "trawl_host_concurrency",
            "Requests a host may have in flight now (its cap, lowered while it throttles or slows down).",
            ["host"],
            registry=r,
        )
        self.host_delay = Gauge(
            "trawl_host_delay_seconds",
            "Seconds between request starts to a host now (politeness, Crawl-delay, raised while it throttles).",
            ["host"],
            registry=r,
        )
        self.throttle_signals = Counter(
            "trawl_throttle_signals_total",
            "Responses asking to slow down (429, 503 with Retry-After), by the source whose request got one.",
            ["source", "host"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "trawl_breaker_state", "A host's circuit breaker: 0 closed, 1 half-open, 2 open.", ["host"], registry=r
        )
        self.breaker_transitions = Counter(
            "trawl_breaker_transitions_total",
            "Circuit breaker state changes, by new state.",
            ["host", "state"],
            registry=r,
        )
        self.outcomes = Counter(
            "trawl_outcomes_total", "URLs that ended, by outcome.", ["source", "outcome"], registry=r
        )
        self.records_staged = Counter(
            "trawl_records_staged_total", "Records written to staging.", ["source"], registry=r
        )
        self.bytes_staged = Counter(
            "trawl_staged_bytes_total",
            "Compressed bytes of staged parts (records and outcomes).",
            ["source"],
            registry=r,
        )
        self.parts_uploaded = Counter(
            "trawl_parts_uploaded_total",
            "Staged parts committed to the staging target.",
            ["source", "kind"],
            registry=r,
        )
        self.s3_uploaded_bytes = Counter(
            "trawl_s3_uploaded_bytes_total", "Bytes of staged parts uploaded to S3.", ["source"], registry=r
        )
        self.s3_spooled_parts = Gauge(
            "trawl_s3_spooled_parts", "Closed parts waiting in the local spool for S3.", registry=r
        )
        self.s3_upload_failures = Counter(
            "trawl_s3_upload_failures_total",
            "S3 uploads that failed after botocore's retries, by kind (transient: the part was spooled).",
            ["kind"],
            registry=r,
        )
        self.rows_loaded = Counter(
            "trawl_rows_loaded_total",
            "Rows loaded into PostgreSQL, by result (inserted, updated, unchanged, rejected).",
            ["source", "result"],
            registry=r,
        )
        self.source_runs = Counter(
            "trawl_source_runs_total", "Crawls of a source that ended, by status.", ["source", "status"], registry=r
        )
        self.source_last_success = Gauge(
            "trawl_source_last_success_timestamp_seconds",
            "When a crawl of the source last completed (Unix time).",
            ["source"],
            registry=r,
        )
        self.runs = Counter(
            "trawl_runs_total", "Flow runs that ended, by flow and status.", ["flow", "status"], registry=r
        )
        self.run_failed = Gauge(
            "trawl_run_failed",
            "1 when the last run of a flow failed (a source or the flow itself), else 0.",
            ["flow"],
            registry=r,
        )
        self.run_seconds = Gauge(
            "trawl_run_duration_seconds", "How long the last run of a flow took.", ["flow"], registry=r
        )

    def host(self, host: str) -> str:
        """The host label: the host itself for the first ``max_hosts`` hosts, ``other`` after that."""
        if host in self._hosts:
            return host
        with self._lock:
            if len(self._hosts) < self.max_hosts:
                self._hosts.add(host)
                return host
        return OTHER_HOST

    def breaker_changed(self, host: str, state: str) -> None:
        """Record a breaker's new state (pybreaker's names: closed, open, half-open)."""
        label = self.host(host)
        self.breaker_state.labels(label).set(BREAKER_STATES.get(state, 0))
        self.breaker_transitions.labels(label, state).inc()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` on ``addr:port`` for the rest of the process (idempotent); returns the port."""
        with self._lock:
            if self._server_port is None:
                server, _ = start_http_server(port, addr=addr, registry=self.registry)
                self._server_port = int(server.server_port)
                log.info("metrics endpoint up", url=f"http://{addr}:{self._server_port}/metrics")
            return self._server_port

    def push(self, url: str, job: str, grouping: dict[str, str] | None = None) -> None:
        """Push everything to a Pushgateway (replacing this job's group); failures are logged, never raised."""
        try:
            push_to_gateway(url, job=job, registry=self.registry, grouping_key=grouping or {}, timeout=10)
        except OSError as exc:
            detail = exc.read().decode(errors="replace").strip() if isinstance(exc, HTTPError) else ""
            log.warning("metrics push failed", pushgateway=url, error=str(exc), detail=detail or None)
        else:
            log.info("metrics pushed", pushgateway=url, job=job)


METRICS = Metrics()
"""The process's metrics."""
