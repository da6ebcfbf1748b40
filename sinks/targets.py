"""Which stager a staging URL names: a local directory or S3."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sinks.s3 import S3Stager
from sinks.stage import LocalStager
from trawl.errors import ConfigError
from trawl.settings import Settings

__all__ = ["open_stager", "staging_target"]


def staging_target(url: str) -> tuple[Literal["s3", "file"], str]:
    """Which target a staging URL names (``s3`` and the URL, or ``file`` and its path), checked without opening or
    resolving anything: a ConfigError when it names none. Also what the flows' ``staging`` parameter is checked by."""
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        S3Stager.check_url(url)
        return "s3", url
    if scheme == "file":
        return "file", url[len("file://") :]  # file://./x is relative (netloc "."); file:///x is absolute
    if scheme == "" or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return "file", url
    raise ConfigError(f"staging {url}: unsupported scheme {scheme!r}; use file://DIR or s3://BUCKET/PREFIX")


def open_stager(
    url: str,
    *,
    settings: Settings | None = None,
    part_max_records: int | None = None,
    part_max_bytes: int | None = None,
) -> LocalStager | S3Stager:
    """The stager for a staging URL: ``file://DIR``, a plain path, or ``s3://BUCKET[/PREFIX]``.

    Nothing is opened here (a bad URL is a ConfigError at once; a local path is
    resolved, so call it off the event loop); use the result as ``async with
    open_stager(url) as stager:``. Part limits default to the settings'
    (``part_max_records``, ``part_max_bytes``), S3 options come from them.
    """
    kind, where = staging_target(url)
    if settings is None:
        settings = Settings(staging=url)
    part_max_records = part_max_records or settings.part_max_records
    part_max_bytes = part_max_bytes or settings.part_max_bytes
    if kind == "s3":
        return S3Stager.from_url(url, settings, part_max_records=part_max_records, part_max_bytes=part_max_bytes)
    return LocalStager(Path(where), part_max_records=part_max_records, part_max_bytes=part_max_bytes)
