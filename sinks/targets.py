"""Which stager a staging URL names: a local directory or S3."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from sinks.s3 import S3Stager
from sinks.stage import LocalStager
from trawl.errors import ConfigError
from trawl.settings import Settings

__all__ = ["open_stager"]


def open_stager(
    url: str,
    *,
    settings: Settings | None = None,
    part_max_records: int | None = None,
    part_max_bytes: int | None = None,
) -> LocalStager | S3Stager:
    """The stager for a staging URL: ``file://DIR``, a plain path, or ``s3://BUCKET[/PREFIX]``.

    Nothing is opened here (a bad URL is a ConfigError at once); use the result
    as ``async with open_stager(url) as stager:``. Part limits default to the
    settings' (``part_max_records``, ``part_max_bytes``), S3 options come from them.
    """
    if settings is None:
        settings = Settings(staging=url)
    part_max_records = part_max_records or settings.part_max_records
    part_max_bytes = part_max_bytes or settings.part_max_bytes
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        return S3Stager.from_url(url, settings, part_max_records=part_max_records, part_max_bytes=part_max_bytes)
    if scheme == "file":
        # file://./x is relative (netloc "."); file:///x is absolute
        rest = url[len("file://") :]
        path = Path(rest)
    elif scheme in ("",) or len(scheme) == 1:  # plain path (or a Windows drive letter)
        path = Path(url)
    else:
        raise ConfigError(f"staging {url}: unsupported scheme {scheme!r}; use file://DIR or s3://BUCKET/PREFIX")
    return LocalStager(path, part_max_records=part_max_records, part_max_bytes=part_max_bytes)
