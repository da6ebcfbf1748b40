"""``trawl run|crawl|load|check|try|reextract|lineage|page|state|demo|runs ls|stage resume``: the command line, a thin shell around the Prefect flows.

Exit codes: 0 every source done; 1 some sources (or loads) failed, the rest
still staged and loaded; 2 bad usage or config, or nothing could start
(unreachable database). A user's mistake is one line per problem on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from importlib.resources import as_file
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from trawl.errors import ConfigError, TrawlError
from trawl.logs import redact

if TYPE_CHECKING:
    from trawl.settings import Settings

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trawl", description="Crawl sources into staging and load them into PostgreSQL.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, *, stages: bool = True, loads: bool = True, file: bool = True) -> None:
        if file:
            sp.add_argument("sources_file", metavar="SOURCES.yaml", help="sources file")
        if stages:
            sp.add_argument("--staging", metavar="URL", help="file://DIR or s3://BUCKET/PREFIX (env TRAWL_STAGING)")
            sp.add_argument(
                "--metrics-port",
                metavar="PORT",
                help="serve Prometheus metrics on 127.0.0.1:PORT/metrics during the run (env TRAWL_METRICS_PORT)",
            )
            sp.add_argument(
                "--source",
                action="append",
                dest="sources",
                metavar="NAME",
                help="only this source (repeatable; default: every enabled source)",
            )
        if loads:
            sp.add_argument(
                "--database-url",
                metavar="DSN",
                help="PostgreSQL to load into, and of the durable frontier (env TRAWL_DATABASE_URL; "
                "default: embedded in .trawl/pg)",
            )
        sp.add_argument("--log-format", choices=("auto", "json", "console"), help="log renderer (env TRAWL_LOG_FORMAT)")

    run = sub.add_parser("run", help="crawl the sources and load them (the pipeline flow)")
    crawl = sub.add_parser("crawl", help="crawl the sources into staging only")
    for sp in (run, crawl):
        common(sp)
        sp.add_argument(
            "--resume",
            metavar="RUN_ID",
            help="continue a run that died: committed sources stay, sources with the durable frontier carry on "
            "from their last checkpoint, the others crawl again",
        )
    load = sub.add_parser("load", help="load committed staged runs not yet in the ledger")
    common(load, file=False)
    load.add_argument("--run-id", action="append", dest="run_ids", metavar="ID", help="only this run (repeatable)")
    common(sub.add_parser("check", help="validate a sources file and report every problem"), stages=False, loads=False)
    lineage = sub.add_parser("lineage", help="every run that touched one row: run, URL, fetched, staged object, load")
    lineage.add_argument("source", metavar="SOURCE", help="source name (its table)")
    lineage.add_argument("key", metavar="KEY", help="the row's _key")
    common(lineage, stages=False, file=False)
    page = sub.add_parser("page", help="write the archived response body a row came from to stdout")
    page.add_argument("source", metavar="SOURCE", help="source name (its table)")
    page.add_argument("key", metavar="KEY", help="the row's _key")
    page.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="the row's Nth version as `trawl lineage` lists them (1 = oldest; default: the current one)",
    )
    page.add_argument(
        "--rendered", action="store_true", help="a browser page's rendered DOM instead of the served body"
    )
    page.add_argument("--staging", metavar="URL", help="file://DIR or s3://BUCKET/PREFIX (env TRAWL_STAGING)")
    common(page, stages=False, file=False)
    lineage.add_argument("--staging", metavar="URL", help="file://DIR or s3://BUCKET/PREFIX (env TRAWL_STAGING)")
    trial = sub.add_parser(
        "try", help="one page through the real request path, extracted and validated; no Prefect, staging or DB"
    )
    trial.add_argument("sources_file", metavar="SOURCES.yaml", help="sources file")
    trial.add_argument("url", metavar="URL", help="the page to try")
    trial.add_argument("--source", required=True, metavar="NAME", help="the html or browser source whose rules apply")
    trial.add_argument("--from-archive", metavar="RUN_ID", help="take the page from this run's archive, fetch nothing")
    trial.add_argument("--staging", metavar="URL", help="where --from-archive finds the run (env TRAWL_STAGING)")
    trial.add_argument("--json", action="store_true", help="print the result as one JSON object")
    trial.add_argument("--log-format", choices=("auto", "json", "console"), help="log renderer (env TRAWL_LOG_FORMAT)")
    reext = sub.add_parser(
        "reextract",
        help="run the current rules over a run's page archive, stage the result as a new run and load it "
        "(no request is made)",
    )
    reext.add_argument("run_id", metavar="RUN_ID", help="the run whose archive to re-extract")
    reext.add_argument(
        "--sources-file",
        default="sources.yaml",
        metavar="FILE",
        help="the sources file with the current rules (default: sources.yaml)",
    )
    reext.add_argument("--no-load", action="store_true", help="stage the new run only")
    common(reext, file=False)
    state = sub.add_parser("state", help="incremental state of api sources: show it, or reset it").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    state_ls = state.add_parser("ls", help="each source's stored cursor value (the largest of its last loaded run)")
    state_ls.add_argument("source", metavar="SOURCE", nargs="?", help="only this source")
    state_reset = state.add_parser(
        "reset", help="forget a source's state (its next run starts from initial_value), or set it with --to"
    )
    state_reset.add_argument("source", metavar="SOURCE", help="the source")
    state_reset.add_argument("--to", metavar="VALUE", help="store this value instead (a number if it parses as one)")
    for sp in (state_ls, state_reset):
        common(sp, stages=False, file=False)
    demo = sub.add_parser("demo", help="serve the bundled demo site and run the pipeline against it")
    common(demo, file=False)
    runs = sub.add_parser("runs", help="staged runs").add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = runs.add_parser("ls", help="list staged runs with their state (committed, incomplete) and counts")
    stage = sub.add_parser("stage", help="staging maintenance").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    resume = stage.add_parser("resume", help="upload a run's spooled parts to S3 and write its manifests")
    resume.add_argument("run_id", metavar="RUN_ID", help="the run to finish")
    for sp in (ls, resume):
        sp.add_argument("--staging", metavar="URL", help="file://DIR or s3://BUCKET/PREFIX (env TRAWL_STAGING)")
        sp.add_argument("--log-format", choices=("auto", "json", "console"), help="log renderer (env TRAWL_LOG_FORMAT)")
    return p


def _fail(message: str, code: int) -> int:
    print(f"trawl: error: {redact(message)}", file=sys.stderr)
    return code


def _quiet_prefect() -> None:
    # Offline and private: no telemetry, and room for the ephemeral server to start on a slow machine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # trawl's log events reach the run's log in Prefect too (as they do under a worker, see prefect.yaml).
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "trawl,flows,sinks,spiders,scrapy,playwright")


def _render(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in (header, *rows)
    )


def _summary(result: dict[str, Any]) -> str:
    """The per-source summary printed at the end of `run`, `crawl` and `demo`."""
    loads = result.get("load") or {}
    rows = [
        (
            s["source"],
            s["status"],
            s.get("pages", 0),
            s.get("records", 0),
            loads[s["source"]]["rejected"] if s["source"] in loads else "-",
            s.get("failures", 0),
            f"{s.get('seconds', 0):.2f}",
        )
        for s in result["crawl"]
    ]
    errors = [f"{s['source']}: {s['error']}" for s in result["crawl"] if s.get("error")]
    errors += [f"{name}: load failed: {s['error']}" for name, s in loads.items() if s.get("error")]
    table = _render(("source", "status", "pages", "records", "rejects", "failures", "seconds"), rows)
    return "\n".join([table, *errors])


def _load_summary(summary: dict[str, dict[str, Any]]) -> str:
    if not summary:
        return "nothing to load: no committed runs in staging"
    cols = ("source", "parts_loaded", "parts_skipped", "inserted", "updated", "unchanged", "rejected", "outcomes")
    table = _render(cols, [(name, *(s[c] for c in cols[1:])) for name, s in summary.items()])
    errors = [f"{name}: load failed: {s['error']}" for name, s in summary.items() if s.get("error")]
    return "\n".join([table, *errors])


def _load_failed(summary: dict[str, dict[str, Any]]) -> bool:
    return any(s.get("error") for s in summary.values())


def _check_database(settings: Settings) -> str:
    """Resolve the database (starting the embedded one if needed) and connect once, before any flow runs."""
    from trawl.database import connect_pool, resolve_dsn

    dsn = resolve_dsn(settings)

    async def probe() -> None:
        pool = await connect_pool(dsn, max_size=1)
        await pool.close()

    asyncio.run(probe())
    return dsn


def _lineage_rows(args: argparse.Namespace) -> list[Any]:
    """Every version of one row (``sinks.postgres.lineage``), oldest first; no Prefect."""
    from sinks.postgres import lineage
    from trawl.database import connect_pool
    from trawl.settings import Settings

    if getattr(args, "staging", None):
        os.environ["TRAWL_STAGING"] = args.staging
    if args.database_url:
        os.environ["TRAWL_DATABASE_URL"] = args.database_url
    settings = Settings()
    dsn = _check_database(settings)

    async def query() -> list[Any]:
        # Local parts are read where they are; S3 parts through the configured staging target.
        s3 = None
        if settings.staging.startswith("s3://"):
            from sinks.targets import open_stager

            s3 = open_stager(settings.staging, settings=settings)
        pool = await connect_pool(dsn, max_size=1)
        try:
            if s3 is None:
                return await lineage(pool, settings.db_schema, args.source, args.key)
            async with s3 as stager:
                return await lineage(pool, settings.db_schema, args.source, args.key, stager=stager)
        finally:
            await pool.close()

    return asyncio.run(query())


def _lineage(args: argparse.Namespace) -> int:
    """``trawl lineage SOURCE KEY``: no Prefect, one query; each version with its archived response."""
    from trawl.settings import Settings

    rows = _lineage_rows(args)
    if not rows:
        print(f"trawl: no loads touched {Settings().db_schema}.{args.source} key {args.key!r}", file=sys.stderr)
        return EXIT_FAILED

    def when(t: Any) -> str:
        return t.isoformat(timespec="seconds") if t is not None else "-"

    header = ("version", "run_id", "url", "fetched_at", "staged_object", "loaded_at", "change", "warc", "offset")
    print(
        _render(
            header,
            [
                (
                    str(n),
                    r["run_id"],
                    r["url"] or "-",
                    when(r["fetched_at"]),
                    r["staged_object"],
                    when(r["loaded_at"]),
                    r["change"] + (": " + "; ".join(r["reasons"]) if r["reasons"] else ""),
                    r["archive"]["warc"] if r.get("archive") else "-",
                    str(r["archive"]["offset"]) if r.get("archive") else "-",
                )
                for n, r in zip(_versions(rows), rows, strict=True)
            ],
        )
    )
    return EXIT_OK


def _versions(rows: Sequence[Any]) -> list[str]:
    """The version number of each lineage entry that wrote the row's content (inserted, updated); "-" for the rest."""
    out, n = [], 0
    for r in rows:
        if r["change"] in ("inserted", "updated"):
            n += 1
            out.append(str(n))
        else:
            out.append("-")
    return out


def _page(args: argparse.Namespace) -> int:
    """``trawl page SOURCE KEY [--version N]``: the archived response body of one version of a row, to stdout."""
    from sinks.targets import open_stager
    from trawl.archive import read_member
    from trawl.settings import Settings

    rows = _lineage_rows(args)
    versions = [r for r, v in zip(rows, _versions(rows), strict=True) if v != "-"]
    where = f"{args.source} key {args.key!r}"
    if not versions:
        return _fail(f"no version of {where} is loaded", EXIT_FAILED)
    if args.version is not None and not 1 <= args.version <= len(versions):
        return _fail(f"{where} has versions 1 to {len(versions)}, not {args.version}", EXIT_USAGE)
    entry = versions[(args.version or len(versions)) - 1]
    ptr = entry.get("archive")
    if not ptr:
        return _fail(f"version {args.version or len(versions)} of {where} (run {entry['run_id']}) has no archived "
                     "response (its source does not archive, or it was staged before the archive)", EXIT_FAILED)  # fmt: skip
    settings = Settings()
    target = open_stager(settings.staging, settings=settings)

    async def read() -> bytes:
        async with target as stager:
            # The response's own member; a browser page's conversion record follows it (read on to the next response).
            length = None if args.rendered else ptr.get("length") or None
            return await stager.read_bytes(ptr["warc"], ptr["offset"], length)

    data = asyncio.run(read())
    page = read_member(data, 0, ptr["warc"])
    body = page.rendered if args.rendered and page.rendered is not None else page.body
    sys.stdout.buffer.write(body)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _try(args: argparse.Namespace) -> int:
    """``trawl try SOURCES.yaml --source NAME URL``: one page, extracted and validated; no Prefect, staging or DB."""
    import orjson

    from sinks.validate import RecordValidator
    from trawl.config import load_sources, select_sources
    from trawl.crawler import source_schema
    from trawl.logs import configure_logging
    from trawl.settings import Settings
    from trawl.trying import try_archived, try_url

    for flag, env in (("staging", "TRAWL_STAGING"), ("log_format", "TRAWL_LOG_FORMAT")):
        if getattr(args, flag, None):
            os.environ[env] = getattr(args, flag)
    settings = Settings()
    configure_logging(settings.log_format, "WARNING")  # the result is the output; warnings still say why
    [source] = select_sources(load_sources(args.sources_file), [args.source])

    from sinks.targets import open_stager

    target = open_stager(settings.staging, settings=settings) if args.from_archive else None  # resolves paths

    async def run() -> Any:
        if target is None:
            return await try_url(source, args.url, settings)
        async with target as stager:
            return await try_archived(source, args.url, args.from_archive, stager, settings)

    trial = asyncio.run(run())
    validator = RecordValidator(source_schema(source)["fields"])
    verdicts = []
    for env in trial.records:
        _values, reasons = validator(env["data"])
        if env["key"] is None:
            reasons = [f"key ({', '.join(source.key_fields)}): missing", *reasons]
        verdicts.append(reasons)
    ok = trial.outcome == "fetched" and not any(verdicts)
    if args.json:
        out = trial.as_dict()
        out["records"] = [
            {**env, "valid": not reasons, "reasons": reasons}
            for env, reasons in zip(trial.records, verdicts, strict=True)
        ]
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK if ok else EXIT_FAILED
    status = f"HTTP {trial.http_status}" if trial.http_status else "no response"
    lines = [
        f"source {trial.source} ({trial.kind}) via {trial.via}: {trial.url}",
        f"outcome: {trial.outcome} ({status}, {trial.attempts} attempt(s), {trial.elapsed_ms} ms)"
        + (f": {trial.error}" if trial.error else ""),
    ]
    if trial.archive:
        lines.append(f"archived at {trial.archive['warc']} offset {trial.archive['offset']}")
    if not trial.records:
        lines.append("records: none from this page")
    for i, (env, reasons) in enumerate(zip(trial.records, verdicts, strict=True), 1):
        verdict = "valid" if not reasons else "REJECTED: " + "; ".join(reasons)
        lines.append(f"record {i}: key {env['key']!r}: {verdict}")
        lines += [f"  {name}: {orjson.dumps(value).decode()}" for name, value in env["data"].items()]
    lines.append(f"links the follow rules keep: {len(trial.links)}")
    lines += [f"  {link}" for link in trial.links]
    print("\n".join(lines))
    return EXIT_OK if ok else EXIT_FAILED


def _reextract(args: argparse.Namespace) -> int:
    """``trawl reextract RUN_ID``: the reextract flow (Prefect runs it locally, as `trawl run` does)."""
    from sinks.targets import open_stager
    from trawl.config import load_sources, select_sources
    from trawl.settings import Settings
    from trawl.staging import RUN_ID_PATTERN

    for flag, env in (
        ("staging", "TRAWL_STAGING"),
        ("database_url", "TRAWL_DATABASE_URL"),
        ("log_format", "TRAWL_LOG_FORMAT"),
    ):
        if getattr(args, flag, None):
            os.environ[env] = getattr(args, flag)
    if not re.fullmatch(RUN_ID_PATTERN, args.run_id):
        raise ConfigError(f"run id {args.run_id!r} must match {RUN_ID_PATTERN}")
    settings = Settings()
    open_stager(settings.staging, settings=settings)
    select_sources(load_sources(args.sources_file), args.sources)  # a bad file or name: one line, before Prefect
    if not args.no_load:
        os.environ["TRAWL_DATABASE_URL"] = _check_database(settings)
    _quiet_prefect()
    import prefect  # noqa: F401  - configure logging after Prefect has applied its own config

    from flows.reextract import reextract
    from trawl.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    result = asyncio.run(reextract(args.run_id, args.sources_file, args.sources, None, None, load_run=not args.no_load))
    for s in result["crawl"]:
        s.setdefault("status", "complete")
    print(_summary(result))
    print(
        f"\nrun {result['run_id']} (re-extracted from {result['reextracted_from']}): staged under {result['staging']}"
    )
    if result["load"]:
        print(_load_summary(result["load"]))
    return EXIT_FAILED if _load_failed(result.get("load") or {}) else EXIT_OK


def _state(args: argparse.Namespace) -> int:
    """``trawl state ls [SOURCE]`` and ``trawl state reset SOURCE [--to VALUE]``: no Prefect, one query."""
    import orjson

    from sinks.state import reset_state, states
    from trawl.database import connect_pool
    from trawl.settings import Settings

    if args.database_url:
        os.environ["TRAWL_DATABASE_URL"] = args.database_url
    settings = Settings()
    dsn = _check_database(settings)
    if args.action == "reset" and not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", args.source):
        raise ConfigError(f"source name {args.source!r} must match [a-z][a-z0-9_]{{0,62}}")

    def parsed(value: str) -> Any:
        try:
            number = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        return number if isinstance(number, int | float) and not isinstance(number, bool) else value

    async def run() -> int:
        pool = await connect_pool(dsn, max_size=1)
        try:
            if args.action == "reset":
                value = parsed(args.to) if args.to is not None else None
                had = await reset_state(pool, settings.db_schema, args.source, value)
                if value is None:
                    print(
                        f"{args.source}: state " + ("reset" if had else "was not set") + "; next run starts from "
                        "initial_value"
                    )
                else:
                    print(f"{args.source}: state set to {orjson.dumps(value).decode()}")
                return EXIT_OK
            rows = await states(pool, settings.db_schema, args.source)
        finally:
            await pool.close()
        if not rows:
            print(
                f"no incremental state in schema {settings.db_schema}" + (f" for {args.source}" if args.source else "")
            )
            return EXIT_OK
        print(
            _render(
                ("source", "cursor_path", "value", "run_id", "updated_at"),
                [
                    (
                        r["source"],
                        r["cursor_path"],
                        orjson.dumps(r["value"]).decode(),
                        r["run_id"],
                        r["updated_at"].isoformat(timespec="seconds"),
                    )
                    for r in rows
                ],
            )
        )
        return EXIT_OK

    return asyncio.run(run())


def _staging(args: argparse.Namespace) -> int:
    """``trawl runs ls`` and ``trawl stage resume RUN_ID``: no Prefect, no database."""
    from sinks.s3 import S3Stager
    from sinks.targets import open_stager
    from trawl.logs import configure_logging
    from trawl.settings import Settings

    for flag, env in (("staging", "TRAWL_STAGING"), ("log_format", "TRAWL_LOG_FORMAT")):
        if getattr(args, flag, None):
            os.environ[env] = getattr(args, flag)
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    stager = open_stager(settings.staging, settings=settings)

    async def runs() -> int:
        async with stager:
            found = await stager.runs()
        if not found:
            print(f"no staged runs in {stager.uri}")
            return EXIT_OK
        rows = [
            (
                r.run_id,
                r.source,
                r.dt,
                r.state,
                r.status or "-",
                r.parts,
                "-" if r.rows is None else r.rows,
                r.bytes,
                r.spooled or "-",
            )
            for r in found
        ]
        print(_render(("run_id", "source", "dt", "state", "status", "parts", "rows", "bytes", "spooled"), rows))
        return EXIT_OK

    async def resume() -> int:
        if not isinstance(stager, S3Stager):
            print(f"nothing to resume: {stager.uri} is a local directory (parts are written in place)")
            return EXIT_OK
        async with stager:
            done = await stager.resume(args.run_id)
        if settings.pushgateway_url:  # the spool changed: its gauge says so (the alert on it resolves)
            from sinks.s3 import spooled_parts
            from trawl.metrics import push_spool

            url, root = settings.pushgateway_url, stager.spool_root
            await asyncio.to_thread(lambda: push_spool(url, str(root), spooled_parts(root)))
        if not done:
            print(f"nothing to resume: run {args.run_id} has nothing in the spool {stager.spool_root}")
            return EXIT_OK
        for r in done:
            print(f"{r.source} {r.kind} run {r.run_id}: {r.message}")
        return EXIT_OK if all(r.committed for r in done) else EXIT_FAILED

    return asyncio.run(runs() if args.command == "runs" else resume())


def _execute(args: argparse.Namespace) -> int:
    from trawl.config import load_sources

    if args.command == "lineage":
        return _lineage(args)
    if args.command == "page":
        return _page(args)
    if args.command == "try":
        return _try(args)
    if args.command == "reextract":
        return _reextract(args)
    if args.command == "state":
        return _state(args)
    if args.command in ("runs", "stage"):
        return _staging(args)

    if args.command == "check":
        spec = load_sources(args.sources_file)
        print(
            f"{args.sources_file}: OK, {len(spec.sources)} source(s): "
            + ", ".join(f"{s.name} ({s.kind})" for s in spec.sources)
        )
        with open(args.sources_file, encoding="utf-8", errors="replace") as f:
            if "${secret:" in f.read():
                print("(${secret:NAME} references are read from Prefect Secret blocks when a flow runs)")
        return EXIT_OK

    for flag, env in (
        ("staging", "TRAWL_STAGING"),
        ("database_url", "TRAWL_DATABASE_URL"),
        ("log_format", "TRAWL_LOG_FORMAT"),
        ("metrics_port", "TRAWL_METRICS_PORT"),
    ):
        if getattr(args, flag, None):
            os.environ[env] = getattr(args, flag)
    with contextlib.ExitStack() as stack:
        if args.command == "demo":
            from trawl.demo import sources_file
            from trawl.demo.site import DemoSiteThread

            # A real path for the flows to open, whatever the install (as_file copies out of a zip if need be).
            args.sources_file = str(stack.enter_context(as_file(sources_file())))
            site = stack.enter_context(DemoSiteThread())
            os.environ["TRAWL_DEMO_URL"] = site.url
            # The demo site is on loopback, which the fetch layer refuses unless allowed.
            os.environ.setdefault("TRAWL_ALLOWED_NETWORKS", '["127.0.0.0/8"]')
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Validate everything a user can get wrong, then run the flow the command names."""
    from sinks.targets import open_stager
    from trawl.config import load_sources, select_sources
    from trawl.settings import Settings

    settings = Settings()
    open_stager(settings.staging, settings=settings)  # a bad staging URL fails here, not inside a flow
    if args.command in ("run", "crawl", "demo"):
        select_sources(load_sources(args.sources_file), args.sources)
    if args.command in ("run", "load", "demo"):
        os.environ["TRAWL_DATABASE_URL"] = _check_database(settings)

    _quiet_prefect()
    import prefect  # noqa: F401  - configure logging after Prefect has applied its own config

    from trawl.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    from flows._common import flow_result

    # The flows end Failed / Degraded / Completed; their result is read from the state whichever it is.
    if args.command == "load":
        from flows.load import load

        loaded = asyncio.run(
            flow_result(load(staging=None, run_ids=args.run_ids, sources=args.sources, return_state=True))
        )
        print(_load_summary(loaded["sources"]))
        return EXIT_FAILED if _load_failed(loaded["sources"]) else EXIT_OK
    if args.command == "crawl":
        from flows.crawl import crawl

        crawled = asyncio.run(
            flow_result(
                crawl(
                    sources_file=args.sources_file, sources=args.sources, resume_run_id=args.resume, return_state=True
                )
            )
        )
        result = {"crawl": crawled["sources"], "run_id": crawled["run_id"], "staging": crawled["staging"]}
    else:
        from flows.pipeline import pipeline

        result = asyncio.run(
            flow_result(
                pipeline(
                    sources_file=args.sources_file,
                    sources=args.sources,
                    resume_run_id=getattr(args, "resume", None),
                    return_state=True,
                )
            )
        )
    print(_summary(result))
    print(f"\nrun {result['run_id']}: staged under {result['staging']}")
    if "load" in result:
        print(
            f"loaded into {redact(os.environ['TRAWL_DATABASE_URL'])} schema {settings.db_schema}: "
            + ", ".join(f"{settings.db_schema}.{s}" for s in result["load"])
        )
    failed = any(s["status"] != "complete" for s in result["crawl"]) or _load_failed(result.get("load") or {})
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trawl`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _execute(args)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"trawl: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:  # settings from the environment
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            print(f"trawl: error: setting TRAWL_{where.upper()}: {err['msg']}", file=sys.stderr)
        return EXIT_USAGE
    except TrawlError as exc:
        from trawl.errors import DatabaseUnavailable

        return _fail(str(exc), EXIT_USAGE if isinstance(exc, DatabaseUnavailable) else EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    raise SystemExit(main())
