"""The process's secret values, and masking them wherever trawl writes.

Values come in from the places that resolve secrets: ``${VAR}`` interpolation
of a sources file (:func:`trawl.config.load_sources`) and Prefect Secret blocks
(the flows). Everything trawl writes — staged record URLs and keys, outcomes
(so lineage and rejects), metrics labels, artifacts, the run summary and every
log line — passes through :func:`mask`, which replaces each registered value
(and its URL-encoded spellings) with ``***``.

The registry is process-wide on purpose: a secret must be masked in every
place that could print it, and those places (a log processor, a Prometheus
label, an exception's text) have no settings object to carry it in.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, quote_plus

__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "clear_secrets",
    "generation",
    "mask",
    "mask_text",
    "mask_url",
    "register_secret",
    "secret_count",
]

MASK = "***"
MIN_SECRET_LENGTH = 6
"""Shorter values are not masked: they cannot be told from ordinary data (``100``, ``true``) without mangling it."""

# The password of a URL's user:password@ (up to the authority's last "@"), wherever a URL sits in a text.
_USERINFO_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@\s:?#]*):[^/\s?#]*@", re.IGNORECASE)

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None
_generation = 0


def register_secret(value: str) -> None:
    """Mask ``value`` (and its URL-encoded spellings) from now on, in everything trawl writes."""
    global _pattern
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return
    spellings = {value, quote(value, safe=""), quote_plus(value), quote(value)}
    with _lock:
        if spellings <= _values:
            return
        _values.update(spellings)
        # Longest first: a secret that contains another is masked whole.
        _pattern = re.compile("|".join(re.escape(v) for v in sorted(_values, key=len, reverse=True)))
        global _generation
        _generation += 1  # after the pattern: whoever sees the new generation masks with the new pattern


def clear_secrets() -> None:
    """Forget every registered value (tests)."""
    global _pattern
    global _generation
    with _lock:
        _values.clear()
        _pattern = None
        _generation += 1


def generation() -> int:
    """Changes whenever the registry does: what was masked before may need masking again (caches key on it)."""
    return _generation


def secret_count() -> int:
    """How many spellings are registered."""
    return len(_values)


def mask(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


def mask_text(text: str) -> str:
    """Free text (an error message, a log line) as trawl writes it: secrets and URL passwords masked."""
    if "@" in text:
        text = _USERINFO_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return mask(text)


def mask_url(url: str) -> str:
    """A URL as trawl writes it: registered secrets masked and a ``user:password@`` password replaced by ``***``."""
    return mask_text(url)
