"""Custom field checks, by registered name only.

A check is a callable ``check(value, data) -> None | bool | str`` (``None``/``True``
pass, ``False`` fails, a string fails with that reason, a ``ValueError`` fails
with its message). A sources file names checks; the loader looks the names up
here. A name means one of:

- a callable registered by the project's own Python code,
  ``@trawl.checks.register("valid_ean")``, imported before the load runs (e.g.
  from the package that defines your spiders);
- an entry point of the ``trawl.checks`` group of an installed distribution
  (``[project.entry-points."trawl.checks"] valid_ean = "mychecks:valid_ean"`` in
  its ``pyproject.toml``), loaded the first time the name is used.

There is no other way in: a manifest in staging can name a check but never an
import path, so whoever can write to staging cannot make the loader run code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "NAME_PATTERN", "Check", "UnknownCheck", "register", "registered", "resolve"]

Check = Callable[[Any, Mapping[str, Any]], "bool | str | None"]

ENTRY_POINT_GROUP = "trawl.checks"
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_.\-]{0,99}"
"""What a check's name looks like (the whole name): an identifier, dots and dashes allowed, no ``:``."""

_REGISTERED: dict[str, Check] = {}
_LOADED: dict[str, Check] = {}  # entry points loaded so far


class UnknownCheck(ValueError):
    """A check name that nothing registered."""


def register(name: str) -> Callable[[Check], Check]:
    """Register a custom check under ``name`` so fields can list it in ``checks:`` (a decorator)."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"check name {name!r} must match {NAME_PATTERN} (no module:function paths)")

    def add(fn: Check) -> Check:
        if not callable(fn):
            raise TypeError(f"check {name!r}: {fn!r} is not callable")
        _REGISTERED[name] = fn
        return fn

    return add


@cache
def _entry_points() -> Mapping[str, EntryPoint]:
    """The installed ``trawl.checks`` entry points by name (read once: it reads package metadata from disk)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registered() -> list[str]:
    """Every check name that resolves: registered in code or installed as an entry point."""
    return sorted({*_REGISTERED, *_entry_points()})


def resolve(name: str) -> Check:
    """The check registered as ``name``; :class:`UnknownCheck` naming the known ones if there is none.

    The first call reads the installed entry points (disk I/O): call it off the event loop.
    """
    fn = _REGISTERED.get(name) or _LOADED.get(name)
    if fn is not None:
        return fn
    ep = _entry_points().get(name)
    if ep is None:
        raise UnknownCheck(
            f"no check registered as {name!r} (registered: {', '.join(registered()) or 'none'}; register one with "
            f"trawl.checks.register or the {ENTRY_POINT_GROUP!r} entry point group)"
        )
    try:
        loaded = ep.load()
    except Exception as exc:  # the entry point's module is broken: say which one
        raise UnknownCheck(f"check {name!r}: entry point {ep.value} cannot be loaded: {exc}") from None
    if not callable(loaded):
        raise UnknownCheck(f"check {name!r}: entry point {ep.value} is not callable")
    _LOADED[name] = loaded
    return _LOADED[name]


@register("not_blank")
def _not_blank(value: Any, data: Mapping[str, Any]) -> str | None:
    return "is blank" if isinstance(value, str) and not value.strip() else None


@register("http_url")
def _http_url(value: Any, data: Mapping[str, Any]) -> str | None:
    if value is None or (isinstance(value, str) and re.match(r"https?://[^/\s]+", value)):
        return None
    return f"not an http(s) URL: {value!r}"
