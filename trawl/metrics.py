"""Prometheus metrics: what an operator watches while trawl runs unattended.

Two kinds, the Prometheus way:

* **Live** (:data:`METRICS`): counters, histograms and gauges of what a process
  is doing, labelled by ``source`` and ``host``, exposed while it runs with
  ``--metrics-port`` / ``TRAWL_METRICS_PORT``. Nothing of it is pushed: a
  gauge pushed by a process about to exit (a breaker state, requests in
  flight) would stay in the Pushgateway for ever.
* **Batch** (:func:`push_source`, :func:`push_flow`, :func:`push_spool`): gauges
  that describe a finished job — per source its last crawl and load, per flow
  its last run, and the S3 spool's size — pushed to ``TRAWL_PUSHGATEWAY_URL``
  into one group per source (``job="trawl", source=…``), per flow
  (``job="trawl", flow=…``) and per spool (``job="trawl", spool=…``). A later run
  of a source replaces its values whatever else ran with it.

Hosts are capped (``TRAWL_METRICS_MAX_HOSTS``): the first N hosts seen keep
their name, the rest fold into ``other``, so a broad crawl cannot blow up the
time-series count. ``source="-"`` is trawl's own traffic that serves no single
source (robots.txt). ``*_created`` series are off unless
``TRAWL_METRICS_CREATED_SERIES`` asks for them.

Every metric name starts with ``trawl_``; ``deploy/prometheus/alerts.yml`` and
``deploy/grafana/trawl.json`` use them (a test checks the names exist).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Final
from urllib.error import HTTPError

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, pushadd_to_gateway, start_http_server
from prometheus_client.metrics_core import Metric

__all__ = [
    "BATCH_SERIES",
    "BREAKER_STATES",
    "METRICS",
    "OTHER_HOST",
    "ROBOTS_SOURCE",
    "Metrics",
    "push_flow",
    "push_source",
    "push_spool",
    "status_class",
]

log = structlog.get_logger("trawl.metrics")

OTHER_HOST: Final = "other"
ROBOTS_SOURCE: Final = "-"
"""The ``source`` label of requests no single source owns: robots.txt, fetched once per origin for all of them."""
BREAKER_STATES: Final[tuple[str, ...]] = ("closed", "half-open", "open")
"""The breakers gauge's ``state`` values (pybreaker's state names)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int | None) -> str:
    """``2xx`` … ``5xx`` for a response, ``error`` for no response (connection error, timeout, size limit)."""
    return f"{status // 100}xx" if status else "error"


class _Registry(CollectorRegistry):
    """A registry that leaves out the ``*_created`` series of counters and histograms unless asked for (in this
    registry only: the process's other registries keep prometheus_client's default)."""

    created_series = False

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            if not self.created_series:
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """trawl's metrics in their own registry (so tests and embedders can read or replace them)."""

    def __init__(self, max_hosts: int = 100) -> None:
        self.registry = _Registry(auto_describe=True)
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
        self.breakers = Gauge(
            "trawl_breakers",
            "Circuit breakers by state (closed, half-open, open): 0 or 1 for a named host, a count for `other`.",
            ["host", "state"],
            registry=r,
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
        self._breaker_of: dict[str, str] = {}

    def host(self, host: str) -> str:
        """The host label: the host itself for the first ``max_hosts`` hosts, ``other`` after that."""
        if host in self._hosts:
            return host
        with self._lock:
            if len(self._hosts) < self.max_hosts:
                self._hosts.add(host)
                return host
        return OTHER_HOST

    def breaker_added(self, host: str) -> None:
        """A host's breaker exists (closed): it counts under its label from its first request."""
        with self._lock:
            if host in self._breaker_of:
                return
            self._breaker_of[host] = "closed"
        label = self.host(host)
        self.breakers.labels(label, "closed").inc()
        # Every state's series exists from 0, so a query sees 0 rather than nothing, and increase() sees the
        # first transition (a counter born at 1 shows no increase).
        for state in BREAKER_STATES:
            self.breakers.labels(label, state).inc(0)
            self.breaker_transitions.labels(label, state).inc(0)

    def breaker_changed(self, host: str, state: str) -> None:
        """Record a breaker's new state (pybreaker's names: closed, open, half-open)."""
        self.breaker_added(host)
        label = self.host(host)
        with self._lock:
            old, self._breaker_of[host] = self._breaker_of[host], state
        self.breakers.labels(label, old).dec()
        self.breakers.labels(label, state).inc()
        self.breaker_transitions.labels(label, state).inc()

    def configure(self, max_hosts: int, created_series: bool) -> None:
        """Apply the settings of the flow about to run (host cap, ``*_created`` series)."""
        self.max_hosts = max_hosts
        self.registry.created_series = created_series

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` on ``addr:port`` for the rest of the process (idempotent); returns the port."""
        with self._lock:
            if self._server_port is None:
                server, _ = start_http_server(port, addr=addr, registry=self.registry)
                self._server_port = int(server.server_port)
                log.info("metrics endpoint up", url=f"http://{addr}:{self._server_port}/metrics")
            return self._server_port


METRICS = Metrics()
"""The process's metrics."""


# -- Batch metrics: pushed when a job ends, one group per source / flow / spool -------------------------------------

_SOURCE_GAUGES: Final[dict[str, str]] = {
    "trawl_source_last_crawl_finished_timestamp_seconds": "When the source's last crawl ended (Unix time).",
    "trawl_source_last_crawl_duration_seconds": "How long the source's last crawl took.",
    "trawl_source_last_crawl_failed": "1 when the source's last crawl failed, else 0.",
    "trawl_source_last_crawl_pages": "Pages (responses) the source's last crawl fetched.",
    "trawl_source_last_crawl_records": "Records the source's last crawl staged.",
    "trawl_source_last_crawl_failures": "URLs of the source's last crawl that did not end fetched or not_modified.",
    "trawl_source_last_crawl_parts": "Record parts the source's last crawl committed.",
    "trawl_source_last_crawl_staged_bytes": "Compressed bytes of the parts (records and outcomes) it committed.",
    "trawl_source_last_crawl_breaker_trips": "Times its hosts' breakers opened during the source's last crawl.",
    "trawl_source_last_success_timestamp_seconds": "When a crawl of the source last completed (Unix time).",
    "trawl_source_last_load_finished_timestamp_seconds": "When the source's last load ended (Unix time).",
    "trawl_source_last_load_failed": "1 when the source's last load failed, else 0.",
}
_LOAD_ROWS: Final = "trawl_source_last_load_rows"
_FLOW_GAUGES: Final[dict[str, str]] = {
    "trawl_flow_last_run_finished_timestamp_seconds": "When the flow's last run ended (Unix time).",
    "trawl_flow_last_run_duration_seconds": "How long the flow's last run took.",
    "trawl_flow_last_run_failed": "1 when the flow's last run ended Failed (every source failed, or it broke).",
    "trawl_flow_last_run_failed_sources": "Sources that failed in the flow's last run.",
}
_SPOOL: Final = "trawl_s3_spooled_parts"

BATCH_SERIES: Final[dict[str, tuple[str, ...]]] = {
    **dict.fromkeys(_SOURCE_GAUGES, ("source",)),
    _LOAD_ROWS: ("source", "result"),
    **dict.fromkeys(_FLOW_GAUGES, ("flow",)),
    _SPOOL: ("spool",),
}
"""Every pushed series with its labels (besides ``job="trawl"``)."""


def _push(url: str, group: dict[str, str], registry: CollectorRegistry) -> bool:
    """Add ``registry``'s series to a Pushgateway group (POST: series not in it keep their values).

    Failures are logged, never raised: metrics must not fail a run.
    """
    try:
        pushadd_to_gateway(url, job="trawl", registry=registry, grouping_key=group, timeout=10)
    except OSError as exc:
        detail = exc.read().decode(errors="replace").strip() if isinstance(exc, HTTPError) else ""
        log.warning("metrics push failed", pushgateway=url, group=group, error=str(exc), detail=detail or None)
        return False
    log.info("metrics pushed", pushgateway=url, group=group)
    return True


def _gauges(values: Mapping[str, float], helps: Mapping[str, str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    for name, value in values.items():
        Gauge(name, helps[name], registry=registry).set(value)
    return registry


def push_source(
    url: str,
    source: str,
    *,
    crawl: Mapping[str, object] | None = None,
    load: Mapping[str, object] | None = None,
    finished: float | None = None,
) -> bool:
    """Push one source's last crawl (its result: status, seconds, counts) and/or last load (totals, error).

    The last-success time is pushed only with a complete crawl, so a failed one keeps the earlier value.
    """
    now = time.time() if finished is None else finished

    def num(d: Mapping[str, object], key: str) -> float:
        v = d.get(key)
        return float(v) if isinstance(v, int | float) else 0.0

    values: dict[str, float] = {}
    if crawl is not None:
        complete = crawl.get("status") == "complete"
        values |= {
            "trawl_source_last_crawl_finished_timestamp_seconds": now,
            "trawl_source_last_crawl_duration_seconds": num(crawl, "seconds"),
            "trawl_source_last_crawl_failed": 0.0 if complete else 1.0,
            "trawl_source_last_crawl_pages": num(crawl, "pages"),
            "trawl_source_last_crawl_records": num(crawl, "records"),
            "trawl_source_last_crawl_failures": num(crawl, "failures"),
            "trawl_source_last_crawl_parts": num(crawl, "parts"),
            "trawl_source_last_crawl_staged_bytes": num(crawl, "staged_bytes"),
            "trawl_source_last_crawl_breaker_trips": num(crawl, "breaker_trips"),
        }
        if complete:
            values["trawl_source_last_success_timestamp_seconds"] = now
    if load is not None:
        values["trawl_source_last_load_finished_timestamp_seconds"] = now
        values["trawl_source_last_load_failed"] = 1.0 if load.get("error") else 0.0
    registry = _gauges(values, _SOURCE_GAUGES)
    if load is not None:
        rows = Gauge(_LOAD_ROWS, "Rows of the source's last load, by result.", ["result"], registry=registry)
        for result in ("inserted", "updated", "unchanged", "rejected"):
            rows.labels(result).set(num(load, result))
    return _push(url, {"source": source}, registry)


def push_flow(url: str, flow: str, *, seconds: float, failed: bool, failed_sources: int) -> bool:
    """Push how a flow's last run ended."""
    values = {
        "trawl_flow_last_run_finished_timestamp_seconds": time.time(),
        "trawl_flow_last_run_duration_seconds": seconds,
        "trawl_flow_last_run_failed": 1.0 if failed else 0.0,
        "trawl_flow_last_run_failed_sources": float(failed_sources),
    }
    return _push(url, {"flow": flow}, _gauges(values, _FLOW_GAUGES))


def push_spool(url: str, spool: str, parts: int) -> bool:
    """Push how many parts wait in an S3 spool now (by whatever just changed it: a crawl, `trawl stage resume`)."""
    registry = CollectorRegistry(auto_describe=True)
    Gauge(_SPOOL, "Closed parts waiting in the local spool for S3.", registry=registry).set(parts)
    return _push(url, {"spool": spool}, registry)
