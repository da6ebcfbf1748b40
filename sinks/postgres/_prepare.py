"""The prepare step: one staged part decoded, validated and deduplicated by key, ready for its transaction.

The common case runs in compiled code: msgspec decodes each JSON line straight
into a struct built from the declared fields (types, ``min``/``max``,
``pattern``, ``max_length`` and ``choices`` as constraints), so a valid record
costs no Python per field. A line the struct refuses — a rule broken, a value
that needs coercion (``"12"`` for an int), an undeclared field, a NUL — goes
through ``sinks.validate.RecordValidator``, the one home of the rules, which
accepts what it may and names *every* reason for what it rejects. Rules with no
compiled form (``parse: number``, ``json`` values, named checks, ``choices`` on
numbers) run in Python on their field only.

It runs in a decoding process (:func:`prepare_part`), so what it hands back is
bytes, not rows: the winning records' keys, hashes and fetch times as COPY text
for the comparison, and each record's row as msgpack, which the loader decodes
(:func:`decode_rows`, msgspec again) only for the rows it writes.
"""

from __future__ import annotations

import math
import os
import re
import resource
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Annotated, Any, Literal

import msgspec
import orjson

from sinks.validate import RecordValidator, jsonb, no_nul
from trawl.errors import StagingError
from trawl.staging import StagedPart

__all__ = [
    "PartDecoder",
    "Prepared",
    "Row",
    "decode_envelope",
    "decode_rows",
    "prepare_part",
    "row_decoder",
    "watch_loader",
]

_BIGINT = 2**63
# A JSON string can only hold U+0000 escaped; such lines take the Python path, which refuses or replaces it.
_NUL = b"\\u0000"

Row = tuple[Any, ...]
"""One record that won its key, as the source table's columns up to ``_first_seen_at``: the declared values,
``_key``, ``_extra`` (JSON text), ``_url``, ``_content_hash``, ``_fetched_at``, ``_first_seen_at``."""

_PY_TYPES: Mapping[str, Any] = {
    "text": str,
    "int": int,
    "float": float,
    "bool": bool,
    "date": date,
    "timestamp": datetime,
    "json": str,
}
_Won = tuple[datetime, int, str, bytes]
"""The record that won its key so far: fetched_at, line, content hash, its :data:`Row` as msgpack."""
_BATCH = 5000  # rows decoded per msgspec call when they are written
# COPY text format: these characters in a value are written as escapes.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


@dataclass(slots=True)
class Prepared:
    """One part decoded, validated, deduplicated and encoded for PostgreSQL (built off the event loop).

    Picklable and made of a few large objects, so it crosses from the decoding
    process cheaply. The records that won their keys (latest ``fetched_at`` in
    the part) are sorted by key; ``compare`` is them as COPY text rows of
    ``_COMPARE_COLS`` (index, key, content hash, fetched_at, line) and
    ``records[i]`` the msgpack of record i's :data:`Row`, decoded in the loader
    only for the rows that are written (:func:`decode_rows`). ``rejects`` are
    ``_rejects`` rows; ``slow`` counts the lines the compiled path handed to the
    Python validator.
    """

    part: StagedPart
    rows: int
    compare: bytes = b""
    records: list[bytes] = field(default_factory=list)
    rejects: list[tuple[Any, ...]] = field(default_factory=list)
    slow: int = 0
    seconds: float = 0.0
    seen_at: datetime | None = None
    """The latest fetch among the part's loaded records (what ``_last_seen_at`` of unchanged rows shows)."""
    peak_rss_mb: float = 0.0
    """The peak RSS of the process that prepared it."""
    cpu_s: float = 0.0
    """The CPU seconds of the process that prepared it, so far."""
    pid: int = 0
    """The process that prepared it."""

    @property
    def loaded(self) -> int:
        """How many records won their keys (one row each in ``_lineage``)."""
        return len(self.records)


def row_decoder(types: Mapping[str, str]) -> msgspec.msgpack.Decoder[list[Row]]:
    """Decodes a msgpack array of :data:`Row` for a source's column types (see :func:`decode_rows`)."""
    declared = [_PY_TYPES[kind] | None for kind in types.values()]
    tail = [str, str | None, str, str, datetime, datetime]
    row: Any = tuple.__class_getitem__((*declared, *tail))  # built at run time from the column types
    return msgspec.msgpack.Decoder(list[row])


def decode_rows(
    decoder: msgspec.msgpack.Decoder[list[Row]], prepared: Prepared, which: Sequence[int], tail: tuple[Any, ...] = ()
) -> Iterator[Row]:
    """The prepared records at these indexes as Python tuples (``tail`` appended), a few thousand at a time.

    Each batch is one msgspec call over a msgpack array made by joining the
    records' bytes: no Python per field, and never a whole part's tuples at once.
    """
    records = prepared.records
    for start in range(0, len(which), _BATCH):
        batch = which[start : start + _BATCH]
        rows = decoder.decode(b"\xdd" + len(batch).to_bytes(4, "big") + b"".join([records[i] for i in batch]))
        yield from ([r + tail for r in rows] if tail else rows)


def decode_envelope(line: bytes, part: StagedPart, n: int) -> dict[str, Any]:
    """A staged line as a dict; StagingError (not a reject) when it is not a JSON object."""
    try:
        env = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise StagingError(f"{part.uri}: line {n} is not JSON: {exc}") from None
    if not isinstance(env, dict):
        raise StagingError(f"{part.uri}: line {n} is not a JSON object")
    return env


def _compiled_type(kind: str, spec: Mapping[str, Any]) -> Any:
    """The msgspec type enforcing a field's type and rules, or None when a rule has no compiled form."""
    if spec.get("checks") or kind == "json":
        return None
    if spec.get("parse"):
        # A JSON number is checked here; a string ("1,299.00") is read by the Python rules (see PartDecoder).
        number = _compiled_type(kind, {k: v for k, v in spec.items() if k != "parse"})
        return None if number is None else number | str
    choices = spec.get("choices")
    meta: dict[str, Any] = {}
    base: Any
    if kind == "text":
        base = str
        if spec.get("pattern"):
            meta["pattern"] = spec["pattern"]
        if spec.get("max_length"):
            meta["max_length"] = spec["max_length"]
        if choices is not None:
            if not all(isinstance(c, str) for c in choices) or meta:
                return None
            base = Literal[tuple(choices)]
    elif kind == "int":
        base = int
        meta = {"ge": -_BIGINT, "le": _BIGINT - 1}
        if choices is not None:
            if not all(type(c) is int for c in choices) or spec.get("min") is not None or spec.get("max") is not None:
                return None
            return Literal[tuple(choices)]
    elif kind == "float":
        base = float
        if choices is not None:
            return None
    elif kind == "bool":
        if choices is not None:
            return None
        base = bool
    elif kind == "date":
        if choices is not None:
            return None
        base = date
    elif kind == "timestamp":
        if choices is not None:
            return None
        base, meta = datetime, {"tz": True}  # naive timestamps mean UTC: the Python path says so
    else:
        return None
    lo, hi = spec.get("min"), spec.get("max")
    if kind == "int":  # a whole number is at least 0.5 when it is at least 1
        if lo is not None:
            meta["ge"] = max(math.ceil(lo), meta["ge"])
        if hi is not None:
            meta["le"] = min(math.floor(hi), meta["le"])
    elif kind == "float":
        if lo is not None:
            meta["ge"] = float(lo)
        if hi is not None:
            meta["le"] = float(hi)
    return Annotated[base, msgspec.Meta(**meta)] if meta else base


class PartDecoder:
    """A source's declaration compiled once per manifest; :meth:`prepare` turns a part's lines into a Prepared."""

    def __init__(
        self,
        fields: Mapping[str, Mapping[str, Any]],
        types: Mapping[str, str],
        key_names: Sequence[str],
        run_id: str,
        source: str,
    ) -> None:
        self.validator = RecordValidator(fields, types)  # resolves named checks: an unknown one fails here
        self.spec = (dict(fields), dict(types), list(key_names), run_id, source)
        """The arguments, to build the same decoder in another process (:func:`prepare_part`)."""
        # Named checks are resolved in this process's registry (registered in code or by entry point): a part
        # whose fields have checks is prepared here, where they were resolved.
        self.portable = not any(spec.get("checks") for spec in fields.values())
        self.types = self.validator.types
        self.rows = row_decoder(self.types)
        self._encode_row = msgspec.msgpack.Encoder().encode
        """Decodes the prepared records the loader writes (:func:`decode_rows`)."""
        self._declared = frozenset(self.types)
        self._run_id, self._source = run_id, source
        self._missing_key = "key: missing (" + ", ".join(key_names) + ")"
        struct_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        self._always: list[bool] = []  # per slow field: Python always, or only for a string (``parse``)
        slow: dict[str, Mapping[str, Any]] = {}
        # Attributes f0, f1, … named as the fields in JSON: a field name need not be a Python identifier.
        rename = {f"f{i}": name for i, name in enumerate(fields)}
        for i, (name, spec) in enumerate(fields.items()):
            kind = self.types[name]
            compiled = _compiled_type(kind, spec)
            if compiled is None or spec.get("parse"):
                slow[name] = spec
                self._always.append(compiled is None)
            if compiled is None:
                struct_fields.append((f"f{i}", Any, None))
            elif spec.get("required"):
                struct_fields.append((f"f{i}", compiled))
            else:
                struct_fields.append((f"f{i}", compiled | None, None))
        # The fields with no compiled form, each run alone through the rules' Python form.
        self._slow = [
            (i, n, always, RecordValidator({n: slow[n]}, types))
            for (i, n), always in zip(((i, n) for i, n in enumerate(fields) if n in slow), self._always, strict=True)
        ]
        self._needs_data = any(spec.get("checks") for spec in slow.values())  # checks see the whole record
        strict = msgspec.defstruct("Data", struct_fields, kw_only=True, forbid_unknown_fields=True, rename=rename)
        lenient = msgspec.defstruct("DataExtra", struct_fields, kw_only=True, rename=rename)
        env: list[tuple[str, Any] | tuple[str, Any, Any]] = [
            ("url", str),
            ("fetched_at", datetime),
            ("content_hash", str),
            ("key", Any, None),
            ("run_id", Any, None),
        ]
        self._strict = msgspec.json.Decoder(msgspec.defstruct("Env", [*env, ("data", strict)], kw_only=True))
        self._lenient = msgspec.json.Decoder(msgspec.defstruct("EnvExtra", [*env, ("data", lenient)], kw_only=True))

    def prepare(self, data: bytes, part: StagedPart) -> Prepared:
        """Decode, validate, deduplicate and encode one part's JSON lines (CPU only: runs off the event loop)."""
        lines = [line for line in data.splitlines() if line]
        if len(lines) != part.rows:
            raise StagingError(f"{part.uri}: has {len(lines)} lines but the manifest says {part.rows}")
        prepared = Prepared(part, len(lines))
        latest: dict[str, _Won] = {}
        strict, lenient, astuple = self._strict.decode, self._lenient.decode, msgspec.structs.astuple
        encode = self._encode_row  # each record's row becomes bytes at once: no part's worth of Python tuples
        slow, needs_data = self._slow, self._needs_data
        declared = self._declared
        for n, line in enumerate(lines, 1):
            extra: str | None = None
            env: Any = None
            if _NUL not in line:
                try:
                    env = strict(line)
                except msgspec.DecodeError:
                    try:
                        env = lenient(line)
                    except msgspec.DecodeError:
                        env = None
                    else:  # undeclared fields: kept in _extra
                        raw = orjson.loads(line).get("data")
                        extra = jsonb({k: v for k, v in raw.items() if k not in declared})
            key = env.key if env is not None else None
            if env is None or type(key) is not str or not key:
                prepared.slow += 1
                self._python(line, n, part, prepared, latest)
                continue
            fetched = env.fetched_at
            if slow:
                values = list(astuple(env.data))
                data_ = orjson.loads(line)["data"] if needs_data else None
                reasons = None
                for i, name, always, validator in slow:
                    if always or type(values[i]) is str:
                        [values[i]], reasons = validator(data_ if data_ is not None else {name: values[i]})
                        if reasons:
                            break
                if reasons:
                    prepared.slow += 1
                    self._python(line, n, part, prepared, latest)  # every reason, the compiled fields' too
                    continue
                row = (*values, key, extra, env.url, env.content_hash, fetched, fetched)
            else:
                row = (*astuple(env.data), key, extra, env.url, env.content_hash, fetched, fetched)
            prev = latest.get(key)
            if prev is None or fetched >= prev[0]:  # the latest fetched_at wins within the part
                latest[key] = (fetched, n, env.content_hash, encode(row))
        self._encode(latest, prepared)
        return prepared

    @staticmethod
    def _encode(latest: Mapping[str, _Won], prepared: Prepared) -> None:
        """The winning records in key order (the table's and the lineage index's order): COPY text and msgpack."""
        keys = sorted(latest)
        if not keys:
            return
        won = [latest[k] for k in keys]
        hashes = [r[2] for r in won]
        # Keys and hashes are written as they are unless one of them needs COPY's escapes.
        if _COPY_SPECIAL.search("".join(keys)):
            keys = [k.translate(_COPY_ESCAPES) for k in keys]
        if _COPY_SPECIAL.search("".join(hashes)):
            hashes = [h.translate(_COPY_ESCAPES) for h in hashes]
        prepared.records = [r[3] for r in won]
        prepared.compare = "".join(
            [
                f"{i}\t{k}\t{h}\t{r[0].isoformat()}\t{r[1]}\n"
                for i, (k, h, r) in enumerate(zip(keys, hashes, won, strict=True))
            ]
        ).encode()
        prepared.seen_at = max(r[0] for r in won)

    def _python(self, line: bytes, n: int, part: StagedPart, prepared: Prepared, latest: dict[str, _Won]) -> None:
        """One record through the rules' Python form: coerced and kept, or rejected with every reason."""
        env = decode_envelope(line, part, n)
        data = env.get("data")
        if not isinstance(data, dict):
            data = {}
        values, reasons = self.validator(data)
        key = env.get("key")
        if key is None or key == "":
            reasons.append(self._missing_key)
        elif "\x00" in str(key):
            reasons.append("key: contains a NUL character")
        try:
            fetched = datetime.fromisoformat(env["fetched_at"])
            url, content_hash = env["url"], env["content_hash"]
        except (KeyError, TypeError, ValueError) as exc:
            raise StagingError(f"{part.uri}: line {n} is not a record envelope: {exc!r}") from None
        if reasons:
            prepared.rejects.append(
                (self._run_id, self._source, no_nul(key), no_nul(url), no_nul(reasons), jsonb(env), part.uri, n)
            )
            return
        key = str(key)
        declared = self._declared
        extra = None if declared >= data.keys() else {k: v for k, v in data.items() if k not in declared}
        prev = latest.get(key)
        if prev is None or fetched >= prev[0]:
            row = (*values, key, jsonb(extra) if extra else None, url, content_hash, fetched, fetched)
            latest[key] = (fetched, n, content_hash, self._encode_row(row))


# The decoding process keeps the decoders of the manifests it is working on (their rules compiled once).
_DECODERS: dict[str, PartDecoder] = {}


def watch_loader(pid: int) -> None:
    """In a decoding process: exit once the loader that started it is gone (it cannot shut its pool down then)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # exists, another user's: not ours, but alive
                pass

    threading.Thread(target=watch, name="trawl-watch-loader", daemon=True).start()


def prepare_part(spec: tuple[Any, ...], data: bytes, part: StagedPart) -> Prepared:
    """A part prepared in the decoding process; ``spec`` is :class:`PartDecoder`'s arguments (picklable)."""
    cache_key = repr(spec)
    decoder = _DECODERS.get(cache_key)
    if decoder is None:
        if len(_DECODERS) >= 4:
            _DECODERS.pop(next(iter(_DECODERS)))
        decoder = _DECODERS[cache_key] = PartDecoder(*spec)
    t = time.perf_counter()
    prepared = decoder.prepare(data, part)
    prepared.seconds = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    prepared.peak_rss_mb = usage.ru_maxrss / 1024
    prepared.cpu_s = usage.ru_utime + usage.ru_stime
    prepared.pid = os.getpid()
    return prepared
