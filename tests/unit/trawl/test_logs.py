"""One JSON log stream with bound context, secrets masked."""

from __future__ import annotations

import logging

import orjson
import pytest
import structlog

from trawl.logs import bind, configure_logging, redact, unbind


def _lines(out: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    bind(run_id="r1", source="shop")
    structlog.get_logger("trawl.test").info("page fetched", url="https://x.example/a")
    unbind("source")
    logging.getLogger("prefect.flow_runs").info("stdlib line", extra={"flow_run_id": "f-1"})

    first, second = _lines(capsys.readouterr().out)
    assert first["event"] == "page fetched"
    assert (first["run_id"], first["source"], first["level"], first["logger"]) == ("r1", "shop", "info", "trawl.test")
    assert first["url"] == "https://x.example/a" and "timestamp" in first
    # Foreign (stdlib/Prefect) records come out in the same shape, with Prefect's run fields.
    assert second["event"] == "stdlib line"
    assert (second["run_id"], second["flow_run_id"], second["logger"]) == ("r1", "f-1", "prefect.flow_runs")
    assert "source" not in second


@pytest.mark.usefixtures("restore_logging")
def test_secrets_are_masked_in_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    structlog.get_logger("trawl.test").warning(
        "connect failed to postgresql://app:hunter2@db:5432/x", url="https://api.example/v1?page=2&api_key=abc123"
    )
    (line,) = _lines(capsys.readouterr().out)
    text = orjson.dumps(line).decode()
    assert "hunter2" not in text and "abc123" not in text
    assert line["url"] == "https://api.example/v1?page=2&api_key=***"


@pytest.mark.usefixtures("restore_logging")
def test_console_renderer_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "INFO")
    structlog.get_logger("trawl.test").info("hello", n=1)
    out = capsys.readouterr().out
    assert "hello" in out and "n=1" in out
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(out.splitlines()[0])


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("postgresql://u:pw@h/db", "postgresql://***@h/db"),
        ("https://tok@h/x", "https://***@h/x"),
        ("https://h/x?token=s&a=1", "https://h/x?token=***&a=1"),
        ("https://h/x?a=1", "https://h/x?a=1"),
        ("no url here", "no url here"),
    ],
)
def test_redact(raw: str, masked: str) -> None:
    assert redact(raw) == masked
