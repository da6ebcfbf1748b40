"""Validation of staged records against a source's declared fields, before anything reaches PostgreSQL.

Each declared field (``trawl.config.FieldRules``, carried in every manifest's
``schema``) compiles once per part into one converter: type coercion with the
rules below, then ``required``, ``pattern``, ``min``/``max``, ``choices``,
``max_length`` and custom checks. A record collects *every* failing reason, so
one look at ``trawl._rejects`` says all that is wrong with it.

Coercion rules (JSON value → column type):

- ``text``: strings as they are; numbers and booleans as their JSON text; objects
  and lists are refused (declare ``json``); U+0000 is refused (PostgreSQL text
  cannot hold it).
- ``int``: JSON integers, floats with no fraction, strings of digits. ``float``:
  JSON numbers, numeric strings. With ``parse: number`` strings like ``"1,299.00"``,
  ``"$ 1 299,5"`` or ``"1.299.000"`` are read as numbers first (see :func:`parse_number`).
- ``bool``: JSON booleans, 0/1, and true/false/yes/no/y/n/t/f/on/off strings.
- ``date``: ``YYYY-MM-DD`` (or the date of an ISO timestamp); ``timestamp``: ISO
  8601, UTC when no offset is given; ``json``: anything.

Custom checks are named Python callables ``check(value, data) -> None | bool | str``:
``None``/``True`` pass, ``False`` fails, a string fails with that reason, and a
``ValueError`` fails with its message. They are looked up by registered name only
(:mod:`trawl.checks`: registered in code or installed as a ``trawl.checks`` entry
point), never imported from a path a manifest names. :func:`check_manifest`
re-validates a manifest's declaration and resolves its checks before the loader
touches the database or runs any check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any

import orjson

from trawl import checks
from trawl.checks import Check
from trawl.config import manifest_schema
from trawl.errors import ConfigError, LoadError
from trawl.staging import Manifest

__all__ = [
    "Check",
    "RecordValidator",
    "check_manifest",
    "coerce",
    "jsonb",
    "no_nul",
    "parse_number",
    "register_check",
    "resolve_check",
]

register_check = checks.register
"""``trawl.checks.register``, kept under the name the loader has always offered."""
resolve_check = checks.resolve

_INT = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}
_BIGINT = 2**63
_SAFE = ("float", "bool")  # kinds whose JSON values of the same Python type need no further check
# Currency signs and codes around a number, and the spaces people put inside one.
_CURRENCY = re.compile(r"^[^\d+\-.,]*?([+-]?\s*[\d.,'\s\u00a0\u202f_]*\d[\d.,'\s\u00a0\u202f_]*)[^\d]*$")
_GROUPING = re.compile(r"[\s'\u00a0\u202f_]")


def no_nul(value: Any) -> Any:
    """``value`` with every U+0000 replaced by U+FFFD (PostgreSQL text and jsonb cannot store it)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {no_nul(k): no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nul(v) for v in value]
    return value


def jsonb(value: Any) -> str:
    """JSON text PostgreSQL's jsonb accepts: NULs become U+FFFD (the staged copy keeps them)."""
    text = orjson.dumps(value).decode()
    return orjson.dumps(no_nul(value)).decode() if "\\u0000" in text else text


def parse_number(text: str) -> float:
    """Read a human-formatted number: ``"1,299.00"`` → 1299.0, ``"1.299,5 €"`` → 1299.5, ``"$ 12"`` → 12.0.

    With both ``,`` and ``.`` the later one is the decimal mark. With one of them
    only, it is a decimal mark when it appears once and is not followed by exactly
    three digits; otherwise it groups thousands. Spaces, apostrophes and
    underscores inside the digits group thousands too.
    """
    m = _CURRENCY.match(text.strip())
    if not m:
        raise ValueError(f"not a number: {text!r}")
    num = _GROUPING.sub("", m.group(1))
    sign = ""
    if num[:1] in "+-":
        sign, num = num[0], num[1:]
    dot, comma = num.rfind("."), num.rfind(",")
    if dot >= 0 and comma >= 0:
        decimal = "." if dot > comma else ","
        num = num.replace("," if decimal == "." else ".", "").replace(decimal, ".")
    elif dot >= 0 or comma >= 0:
        mark = "." if dot >= 0 else ","
        head, _, tail = num.rpartition(mark)
        if num.count(mark) == 1 and len(tail) != 3:
            num = f"{head}.{tail}"
        elif all(len(g) == 3 for g in num.split(mark)[1:]) and head.replace(mark, ""):
            num = num.replace(mark, "")
        else:
            raise ValueError(f"not a number: {text!r}")
    try:
        return float(sign + num)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def coerce(value: Any, kind: str, *, parse: str | None = None) -> Any:
    """Convert a staged JSON value to the Python value asyncpg writes for ``kind``; ValueError if it cannot."""
    if value is None:
        return None
    match kind:
        case "text":
            if type(value) is str:
                if "\x00" in value:
                    raise ValueError("contains a NUL character, which PostgreSQL text cannot store")
                return value
            if isinstance(value, (dict, list)):
                raise ValueError(f"expected text, got {type(value).__name__}")
            return orjson.dumps(value).decode()
        case "int":
            if type(value) is int:
                pass
            elif isinstance(value, bool):
                raise ValueError("expected int, got bool")
            elif isinstance(value, float) and value.is_integer():
                value = int(value)
            elif isinstance(value, str) and _INT.match(value.strip()):
                value = int(value.strip())
            elif isinstance(value, str) and parse == "number":
                number = parse_number(value)
                if not number.is_integer():
                    raise ValueError(f"expected a whole number, got {value!r}")
                value = int(number)
            if type(value) is not int:
                raise ValueError(f"expected int, got {value!r}")
            if not -_BIGINT <= value < _BIGINT:
                raise ValueError(f"int {value} does not fit in bigint")
            return value
        case "float":
            if type(value) is float:
                return value
            if isinstance(value, bool):
                raise ValueError("expected float, got bool")
            if isinstance(value, int):
                return float(value)
            if isinstance(value, str):
                if parse == "number":
                    return parse_number(value)
                try:
                    return float(value.strip())
                except ValueError:
                    pass
            raise ValueError(f"expected float, got {value!r}")
        case "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError(f"expected bool, got {value!r}")
        case "date":
            if isinstance(value, str):
                try:
                    return date.fromisoformat(value.strip())
                except ValueError:
                    pass
                try:  # the date part of a full timestamp, never of any string that starts like a date
                    return datetime.fromisoformat(value.strip()).date()
                except ValueError:
                    pass
            raise ValueError(f"expected date (YYYY-MM-DD), got {value!r}")
        case "timestamp":
            if isinstance(value, str):
                try:
                    ts = datetime.fromisoformat(value.strip())
                except ValueError:
                    pass
                else:
                    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
            raise ValueError(f"expected ISO 8601 timestamp, got {value!r}")
        case "json":
            return jsonb(value)
    raise ValueError(f"unknown type {kind!r}")


def check_manifest(manifest: Manifest) -> None:
    """Refuse a manifest whose declaration the sources file's models reject or that names an unknown check.

    The loader calls it (off the event loop: the first lookup reads the installed
    entry points) before anything of the manifest is loaded, so a manifest someone
    wrote into staging by hand runs nothing. LoadError names the manifest.
    """
    where = manifest.uri
    try:
        declared = manifest_schema(manifest.source, manifest.schema, where)
    except ConfigError as exc:
        problems = "; ".join(": ".join(filter(None, (i.entry, i.field, i.message))) for i in exc.issues)
        raise LoadError(f"manifest {where}: {problems or exc}", staged_object=where) from None
    for name, spec in declared.fields.items():
        for check in spec.checks:
            try:
                checks.resolve(check)
            except checks.UnknownCheck as exc:
                raise LoadError(f"manifest {where}: field {name!r}: {exc}", staged_object=where) from None


def _fmt(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else str(n)


Converter = Callable[[Any, Mapping[str, Any], list[str]], Any]


def _converter(name: str, spec: Mapping[str, Any]) -> Converter:
    """One field's coercion and rules as a closure that appends its reasons to a list."""
    kind: str = spec["type"]
    parse = spec.get("parse")
    required = bool(spec.get("required"))
    pattern = re.compile(spec["pattern"]) if spec.get("pattern") else None
    lo, hi = spec.get("min"), spec.get("max")
    choices = spec.get("choices")
    allowed = {orjson.dumps(c) for c in choices} if choices else None
    max_length = spec.get("max_length")
    try:
        checks = [(c, resolve_check(c)) for c in spec.get("checks") or ()]
    except ValueError as exc:
        raise LoadError(f"field {name!r}: {exc}") from None
    plain = not (pattern or lo is not None or hi is not None or allowed or max_length or checks)
    # The common case, a JSON value already of the column's type, skips coerce() (a third of the load's CPU).
    fast: Any = {"text": str, "int": int, "float": float, "bool": bool}.get(kind)

    def convert(raw: Any, data: Mapping[str, Any], reasons: list[str]) -> Any:
        value: Any
        if type(raw) is fast and (
            (kind == "text" and "\x00" not in raw) or (kind == "int" and -_BIGINT <= raw < _BIGINT) or kind in _SAFE
        ):
            value = raw
        else:
            try:
                value = coerce(raw, kind, parse=parse)
            except ValueError as exc:
                reasons.append(f"{name}: {exc}")
                return None
        if value is None:
            if required:
                reasons.append(f"{name}: required but missing")
            return None
        if plain:
            return value
        if pattern is not None and not pattern.search(value):
            reasons.append(f"{name}: {value!r} does not match {pattern.pattern!r}")
        if max_length is not None and len(value) > max_length:
            reasons.append(f"{name}: {len(value)} characters, more than max_length {max_length}")
        if lo is not None and value < lo:
            reasons.append(f"{name}: {_fmt(value)} is less than min {_fmt(lo)}")
        if hi is not None and value > hi:
            reasons.append(f"{name}: {_fmt(value)} is more than max {_fmt(hi)}")
        if allowed is not None and orjson.dumps(orjson.loads(value) if kind == "json" else value) not in allowed:
            reasons.append(f"{name}: {value!r} is not one of {choices!r}")
        for check_name, check in checks:
            try:
                verdict = check(value, data)
            except ValueError as exc:
                verdict = str(exc) or False
            except Exception as exc:  # a bug in the check, not bad data: stop rather than reject everything
                raise LoadError(f"field {name!r}: check {check_name} raised {exc!r}") from exc
            if verdict is False:
                reasons.append(f"{name}: fails check {check_name}")
            elif isinstance(verdict, str):
                reasons.append(f"{name}: {verdict} (check {check_name})")
        return value

    return convert


class RecordValidator:
    """A source's declared fields compiled once; call it on a record's ``data`` for (values, reasons)."""

    def __init__(self, fields: Mapping[str, Mapping[str, Any]], types: Mapping[str, str] | None = None) -> None:
        """``types`` overrides declared types by the table's (loading an old run after a type change)."""
        self.types: dict[str, str] = {n: (types or {}).get(n, spec["type"]) for n, spec in fields.items()}
        self._convert = [(n, _converter(n, {**spec, "type": self.types[n]})) for n, spec in fields.items()]

    def __call__(self, data: Mapping[str, Any]) -> tuple[list[Any], list[str]]:
        reasons: list[str] = []
        get = data.get
        return [convert(get(n), data, reasons) for n, convert in self._convert], reasons
