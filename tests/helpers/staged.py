"""Staged parts read back from a local staging directory: the gzip JSON Lines the stager wrote, one dict a line."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

__all__ = ["part_lines", "staged_lines", "staged_parts"]


def staged_parts(root: Path, source: str, *, run_id: str = "*", kind: str = "raw") -> list[Path]:
    """The ``kind`` (``raw`` or ``outcomes``) parts of ``source`` under a staging root, for one run or all, in order."""
    return sorted(root.glob(f"{kind}/source={source}/dt=*/run={run_id}/part-*.jsonl.gz"))


def part_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of one JSON Lines file, gzip-compressed or not (by its suffix), streamed.

    Every line must be one JSON value: a blank or broken line raises, as it should in a staged part.
    """
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
        yield from (orjson.loads(line) for line in f)


def staged_lines(root: Path, source: str, *, run_id: str = "*", kind: str = "raw") -> list[dict[str, Any]]:
    """Every line of every part :func:`staged_parts` finds, in part order."""
    return [line for part in staged_parts(root, source, run_id=run_id, kind=kind) for line in part_lines(part)]
