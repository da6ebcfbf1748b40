"""One log stream: structlog JSON lines (a console renderer on a TTY) for trawl, Prefect and the stdlib.

Context (``run_id``, ``flow_run_id``, ``source``, ``host``, ``url``) is bound
with contextvars, so every line logged inside a source's task carries it.
Configure after ``import prefect``: Prefect applies its own logging config once
on import, and we replace its console handlers while keeping the handlers that
ship run logs to the Prefect API.

Secrets never reach a line: redaction (:func:`redact`: the values registered in
:mod:`trawl.masking`, URL passwords, credential query parameters and
``Bearer …`` credentials, and every value under a credential-looking key) is
the last processor before rendering, after tracebacks are formatted, and the
handlers that ship records to the Prefect API format through it too.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from typing import Any, Literal

import structlog
from structlog.types import EventDict, Processor

from trawl.masking import mask_text

__all__ = ["bind", "configure_logging", "redact", "unbind"]

bind = structlog.contextvars.bind_contextvars
unbind = structlog.contextvars.unbind_contextvars

# userinfo in URLs/DSNs and credential-looking query parameters never reach a log line.
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(?::[^/@\s]*)?@", re.IGNORECASE)
_SECRET_QS = re.compile(
    r"(?P<k>[?&](?:access_token|api_key|apikey|token|key|password|secret|sig|signature)=)[^&\s#]+", re.IGNORECASE
)


_AUTH_SCHEME = re.compile(r"\b(?P<scheme>Bearer|Basic|Token|Digest)\s+[A-Za-z0-9._~+/=:-]+", re.IGNORECASE)
_SECRET_KEY = re.compile(
    r"^(authorization|proxy-authorization|cookie|set-cookie|x-api-key|api[-_]?key|.*password|.*secret|.*token)$",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Mask registered secrets, passwords in URLs/DSNs, credential query parameters and ``Bearer …`` credentials."""
    text = mask_text(text)
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    text = _SECRET_QS.sub(lambda m: f"{m.group('k')}***", text)
    return _AUTH_SCHEME.sub(lambda m: f"{m.group('scheme')} ***", text)


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(key, str) and _SECRET_KEY.match(key) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):  # e.g. headers={...}
        return {k: _redact_value(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value("", v) for v in value]
    return value


def _redact_values(_: Any, __: str, event: EventDict) -> EventDict:
    for k, v in event.items():
        event[k] = _redact_value(k, v)
    return event


class _RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter: the whole formatted record (message and traceback) redacted."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def _redact_api_handlers() -> None:
    """Every handler that ships records to the Prefect API (its run loggers, ``PREFECT_LOGGING_EXTRA_LOGGERS``)
    formats through :func:`redact`."""
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    for logger in loggers:
        for h in logger.handlers:
            if "APILogHandler" in type(h).__name__ and not isinstance(h.formatter, _RedactingFormatter):
                h.setFormatter(_RedactingFormatter(h.formatter))


# Prefect's handlers that write to the console (the API handlers stay: they feed the Prefect UI).
_CONSOLE_HANDLER_LOGGERS = ("", "prefect", "prefect._internal", "uvicorn", "fastapi", "prefect.server")


def configure_logging(fmt: Literal["auto", "json", "console"] = "auto", level: str = "INFO") -> None:
    """Route trawl's, Prefect's and the stdlib's loggers into one structlog renderer on stdout."""
    if "prefect" in sys.modules:
        # Prefect applies its logging config once, lazily (on loading `prefect.main`): let it go first, so its
        # API handlers exist to be redacted and a later import does not configure over ours.
        importlib.import_module("prefect.main")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()) if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            *shared,
            # Prefect puts flow_run_id/task_run_name etc. on the record as extras.
            structlog.stdlib.ExtraAdder(
                allow=("flow_run_id", "flow_run_name", "flow_name", "task_run_id", "task_run_name", "task_name")
            ),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_values,  # last before rendering: after the traceback became text
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    handler.set_name("trawl")
    for name in _CONSOLE_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h.get_name() == "trawl" or type(h).__name__ != "APILogHandler":
                logger.removeHandler(h)
        if name:
            logger.propagate = True
    _redact_api_handlers()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("trawl", "flows", "sinks", "spiders", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(level.upper())
    # Scrapy's DEBUG is a line per request and item: it follows trawl's level from INFO up.
    # (Runner mode leaves Scrapy's LOG_LEVEL alone: the logger's level is the one that counts.)
    logging.getLogger("scrapy").setLevel(max(logging.INFO, logging.getLevelName(level.upper())))
    for noisy in ("httpx", "httpcore", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
