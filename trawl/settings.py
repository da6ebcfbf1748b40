"""The one settings object, read from ``TRAWL_*`` environment variables.

Settings are built once at the edge (CLI, flow entry) and passed down
explicitly; nothing deeper in the call tree reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from trawl.proxies import check_proxy_url

__all__ = ["Settings", "markdown_table"]


class Settings(BaseSettings):
    """Every knob trawl has, each overridable as ``TRAWL_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="TRAWL_", extra="ignore", frozen=True)

    staging: str = Field(
        default="file://./.trawl/staging",
        description="Where raw records and outcomes are staged: `file://DIR` (or a plain path) or `s3://BUCKET/PREFIX`.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL DSN to load into. Unset: an embedded PostgreSQL under `embedded_pg_dir`.",
    )
    db_schema: str = Field(
        default="trawl",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema holding the source tables and the `_runs`/`_loads`/`_rejects`/`_outcomes` tables.",
    )
    embedded_pg_dir: Path = Field(
        default=Path(".trawl/pg"),
        description="Data directory of the embedded PostgreSQL used when no database URL is given.",
    )
    db_pool_size: int = Field(
        default=4,
        ge=1,
        le=100,
        description="Connections the loader opens to PostgreSQL; sources load concurrently up to this many.",
    )
    max_reject_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Share of a run's records (0-1) that may be rejected before its load fails instead of loading a "
        "broken scrape; checked once `reject_min_rows` records were seen and at the last part. 1 turns it off.",
    )
    max_failed_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of a source's URLs (0-1) that may end failed, skipped_breaker or blocked_network before "
        "the source's crawl fails; a source's own `max_failed_ratio` wins. 1 turns it off: then a source fails only "
        "when it fetched nothing and some URL failed (that rule always applies).",
    )
    reject_min_rows: int = Field(
        default=100,
        ge=1,
        description="Records of a run seen before `max_reject_rate` applies (its last part is always checked).",
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs the fetch layer may connect to even though they are loopback/private/link-local "
        "(e.g. `127.0.0.0/8` for a local demo). Empty: only public addresses.",
    )
    proxies: list[Annotated[str, AfterValidator(check_proxy_url)]] = Field(
        default_factory=list,
        description="Forward proxies (`http://[user:password@]host:port`, `https://...`) every source's requests go "
        "through unless the source lists its own; each has its own breaker. A proxy's address must be public or in "
        "`allowed_networks`. As JSON: `TRAWL_PROXIES='[\"http://p1:3128\"]'`.",
    )
    proxy_rotation: Literal["per_request", "sticky"] = Field(
        default="per_request",
        description="`per_request`: the proxies take turns; `sticky`: each host keeps one proxy while it works.",
    )
    per_host_concurrency: int = Field(
        default=8, ge=1, description="At most this many requests in flight to one host (sources may lower it)."
    )
    per_host_delay: float = Field(
        default=0.0, ge=0, description="At least this many seconds between request starts to one host."
    )
    total_concurrency: int = Field(
        default=128, ge=1, description="At most this many requests in flight across all hosts of one process."
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to establish a connection.")
    read_timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for the next bytes of a response.")
    total_timeout: float = Field(default=60.0, gt=0, description="Seconds one attempt may take in all.")
    max_retries: int = Field(
        default=3,
        ge=0,
        description="Retries after the first attempt for transient failures (connect errors, timeouts, 5xx). "
        "Throttle signals (429, 503 with `Retry-After`) are retried without using one.",
    )
    backoff_base: float = Field(
        default=0.5, ge=0, description="Base of the exponential backoff between retries, in seconds (full jitter)."
    )
    backoff_max: float = Field(
        default=30.0,
        ge=0,
        description="Cap on one backoff sleep, `Retry-After` included (a throttled host's pause too).",
    )
    max_redirects: int = Field(default=10, ge=0, description="Redirects followed before a URL fails.")
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest response body accepted (after decompression)."
    )
    breaker_fail_max: int = Field(
        default=5,
        ge=1,
        description="Consecutive failed requests (connect errors, timeouts, resets, 5xx without `Retry-After`, "
        "truncated bodies) after which a host's breaker opens. Throttle signals do not count.",
    )
    breaker_reset_timeout: float = Field(
        default=30.0, gt=0, description="Seconds an open breaker waits before letting one probe request through."
    )
    breaker_requeues: int = Field(
        default=2,
        ge=0,
        description="Times a URL skipped by an open breaker is put back to wait for it to close; then `skipped_breaker`.",
    )
    throttle_budget: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a host may keep throttling (429, 503 with `Retry-After`) at its slowest rate without one "
        'good answer; then its remaining URLs end `failed` ("throttled"), and it is tried again after as long. '
        "Until then a throttled host is paused "
        "for its `Retry-After`, its concurrency halved and its delay raised, and both grow back with its successes.",
    )
    max_crawl_delay: float = Field(
        default=10.0,
        ge=0,
        description="Cap on a robots.txt `Crawl-delay`, and on the delay a throttling host is given (seconds between "
        "request starts to a host).",
    )
    robots_unavailable: Literal["allow", "disallow"] = Field(
        default="disallow",
        description="What a robots.txt that cannot be fetched (5xx, connection errors) means: `disallow` everything, "
        "as RFC 9309 asks, or `allow` everything, as Scrapy does. A 4xx always means allow; a 429 fails the asking "
        "URL as throttled and the file is asked for again later.",
    )
    robots_failure_ttl: float = Field(
        default=300.0,
        ge=0,
        description="Seconds a verdict from a robots.txt fetch that failed (5xx, unreachable, 429) is kept before the "
        "file is fetched again (a Retry-After shortens it); a file that was read is kept for the run.",
    )
    user_agent: str = Field(
        default="trawl/0.1 (+https://github.com/trawl/trawl)", description="User-Agent header sent with every request."
    )
    part_max_records: int = Field(default=50_000, ge=1, description="A staged part is closed after this many lines.")
    part_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="A staged part is closed once this many compressed bytes are written.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2, moto). Unset: AWS, from the region.",
    )
    s3_region: str | None = Field(
        default=None,
        description="S3 region. Unset: the AWS default chain (`AWS_REGION`, `AWS_DEFAULT_REGION`, `~/.aws/config`). "
        "Credentials always come from the AWS default chain.",
    )
    s3_addressing_style: Literal["auto", "virtual", "path"] = Field(
        default="auto", description="`path` for stores that need `endpoint/bucket/key` URLs (most MinIO setups)."
    )
    s3_sse: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="Server-side encryption of staged objects: `AES256` or `aws:kms` (unset: none)."
    )
    s3_sse_kms_key_id: str | None = Field(
        default=None, description="KMS key id or ARN with `s3_sse=aws:kms` (unset: the bucket's default key)."
    )
    s3_storage_class: str | None = Field(
        default=None, description="Storage class of staged objects, e.g. `STANDARD_IA` (unset: the bucket's default)."
    )
    s3_tagging: bool = Field(
        default=True, description="Tag staged objects with `source` and `run_id` (off for stores without tagging)."
    )
    s3_part_size: int = Field(
        default=8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        description="Bytes per multipart chunk: a part is uploaded a chunk at a time as it grows (S3's minimum: 5 MiB).",
    )
    s3_max_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Uploads to S3 in flight at once; memory holds at most this many chunks.",
    )
    s3_max_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts of one S3 request (botocore's standard retries: connection errors, 5xx, throttling).",
    )
    s3_backoff_base: float = Field(
        default=1.0, ge=0, description="Base of the backoff between retries of a spooled part's upload, in seconds."
    )
    s3_backoff_max: float = Field(
        default=60.0, ge=0, description="Cap on one backoff sleep between retries of a spooled part's upload."
    )
    s3_connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to connect to S3.")
    s3_read_timeout: float = Field(default=60.0, gt=0, description="Seconds to wait for S3's answer.")
    s3_commit_timeout: float = Field(
        default=600.0,
        ge=0,
        description="Seconds a source's commit waits for its spooled parts to reach S3; then the run fails, the "
        "spool is kept and `trawl stage resume RUN_ID` finishes it.",
    )
    s3_spool_dir: Path = Field(
        default=Path(".trawl/spool"),
        description="Local directory where parts wait for S3 (while they upload, and while S3 is unavailable).",
    )
    s3_spool_max_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024,
        ge=1,
        description="Bytes of closed parts the spool may hold on their way to S3; beyond this, new parts wait for room "
        "(up to `s3_commit_timeout` seconds, then the source fails).",
    )
    frontier: Literal["memory", "postgres"] = Field(
        default="memory",
        description="Where `html` crawls and `spider` sources keep their URLs: `memory` (fast, gone with the process) "
        "or `postgres` (durable: checkpointed as they go, so `trawl crawl --resume RUN_ID` continues a crawl that "
        "died). A source's `frontier` overrides it.",
    )
    frontier_batch: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="URLs claimed from (and links inserted into) the durable frontier at once.",
    )
    frontier_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a claimed URL (and, in a sharded crawl, a host) stays with its crawler before another "
        "may take it: a crawler renews its leases every third of this and at each checkpoint, so a machine that "
        "vanishes has its work taken over by the live shards within this time.",
    )
    frontier_checkpoint_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Durable frontier: how often closed parts and done URLs are committed. A crawler killed "
        "fetches again at most what it fetched since its last checkpoint.",
    )
    shard_deployment: str = Field(
        default="crawl-shard/default",
        description="The deployment (`FLOW/NAME`) that runs one shard of a source with `shards: N`.",
    )
    shard_replacements: int = Field(
        default=3,
        ge=0,
        description="A shard run that Prefect reports `Crashed` or `Failed` is replaced at once (resuming from its "
        "last checkpoint) up to this many times per source; past it the source fails with the reason.",
    )
    max_pages: int | None = Field(
        default=None, ge=1, description="Stop each source after this many fetched pages (None: no limit)."
    )
    queue_size: int = Field(
        default=1000, ge=1, description="Bound of the queues between fetch workers and the stager (back-pressure)."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="`json` lines, a readable `console` renderer, or `auto`: console on a TTY, else JSON.",
    )
    log_level: str = Field(default="INFO", description="Lowest level logged by trawl's own loggers.")
    source_lock: Literal["wait", "refuse", "off"] = Field(
        default="wait",
        description="Two flow runs never crawl one source at once (a Prefect global concurrency limit "
        "`trawl-source-NAME`): the second `wait`s for it, is `refuse`d at once, or `off` skips the lock.",
    )
    source_lock_timeout: float = Field(
        default=3600.0, gt=0, description="Seconds a flow run waits for a source busy in another run, then fails it."
    )
    progress_interval: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between progress log lines (one per running source, without a terminal) and updates "
        "of a crawl's progress artifact in Prefect.",
    )
    progress: Literal["auto", "live", "log", "off"] = Field(
        default="auto",
        description="How `trawl run|crawl|load` show progress: `live` a view redrawn in place (rich), `log` a "
        "line per source every `progress_interval` s, `off` neither; `auto`: `live` on a terminal, else `log`.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on 127.0.0.1:PORT/metrics while a flow runs (unset: off; 0: any free port).",
    )
    metrics_max_hosts: int = Field(
        default=100, ge=1, description="Hosts that get their own metrics label; further hosts are counted as `other`."
    )
    pushgateway_url: str | None = Field(
        default=None,
        description="Push each run's batch metrics (per source and per flow: last finish, last success, duration, "
        "counts, failed) and the S3 spool's size to this Prometheus Pushgateway when they change (unset: off).",
    )
    metrics_created_series: bool = Field(
        default=False,
        description="Also expose a `*_created` series (the creation time) for each counter and histogram.",
    )
    browser_path: str | None = Field(
        default=None,
        description="Chromium executable for `browser` sources. Unset: Playwright's own Chromium if installed, "
        "else the system's (`/usr/lib/chromium/chromium`, `chromium`, `chromium-browser`, `google-chrome`).",
    )
    browser_sandbox: bool = Field(
        default=False,
        description="Run Chromium's renderers in its sandbox. Needs a non-root user (and user namespaces); as root "
        "Chromium runs unsandboxed (`--no-sandbox`): see the README's browser section.",
    )
    browser_pages: int = Field(default=4, ge=1, le=64, description="Pages rendering at once (the browser pool's size).")
    browser_navigation_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a page may take to load in the browser (one attempt)."
    )
    browser_wait_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a rendered page may take to show its `wait_for` selector."
    )
    browser_page_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds one page may take in the browser in all (navigation, waits, scrolling, reading the "
        "rendered HTML); past it the page is closed and its URL `failed`, not retried.",
    )
    browser_contexts: int = Field(
        default=16,
        ge=1,
        description="Browser contexts (one per host) kept open; past it the least recently used idle one is closed.",
    )
    browser_context_idle: float = Field(
        default=120.0, gt=0, description="Seconds an idle browser context (one per host) is kept before it is closed."
    )
    browser_block_resources: list[str] = Field(
        default_factory=lambda: ["image", "media", "font"],
        description="Resource types rendered pages do not load (Playwright's resource type names).",
    )
    demo_url: str | None = Field(
        default=None, description="Base URL of the demo site; `trawl demo` sets it for `examples/demo.yaml`."
    )

    def database_dsn(self) -> str | None:
        """The configured DSN as plain text (never log it)."""
        return self.database_url.get_secret_value() if self.database_url else None


def markdown_table() -> str:
    """The README's settings table, generated from the fields: ``python -m trawl.settings``."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        shown = "(unset)" if default is None else default
        rows.append(f"| `TRAWL_{name.upper()}` | `{shown}` | {f.description} |")
    return "\n".join(rows)


def _write_readme(path: Path) -> None:
    """Replace the settings table in the README with :func:`markdown_table`."""
    text = path.read_text(encoding="utf-8")
    start = text.index("| variable | default | what it does |")
    end = text.find("\n\n", start)
    path.write_text(text[:start] + markdown_table() + (text[end:] if end >= 0 else "\n"), encoding="utf-8")


if __name__ == "__main__":  # python -m trawl.settings [--write-readme README.md]
    import sys

    if sys.argv[1:2] == ["--write-readme"]:
        _write_readme(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        print(markdown_table())
