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

It runs in a decoding process (:func:`prepare_part`) fed the part as it is
staged (gzip), inflated a chunk at a time. What it hands back is files, not
rows: the winning records' keys, hashes and fetch times as COPY text for the
comparison, and their rows as COPY CSV (each row one msgspec call, the JSON
array's brackets cut off: strings quoted with backslash escapes, ``null`` for
NULL), with each row's offset, so the loader streams the rows it writes to
PostgreSQL as bytes (:func:`copy_rows`) and never decodes a record again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import shutil
import threading
import time
import zlib
from array import array
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Annotated, Any, BinaryIO, Literal

import msgspec
import orjson

from sinks.validate import RecordValidator, jsonb, no_nul
from trawl.errors import StagingError
from trawl.staging import StagedPart

__all__ = [
    "COPY_CSV",
    "PartDecoder",
    "Prepared",
    "Row",
    "copy_rows",
    "decode_envelope",
    "prepare_part",
    "watch_loader",
]

_BIGINT = 2**63
# A JSON string can only hold U+0000 escaped; such lines take the Python path, which refuses or replaces it.
_NUL = b"\\u0000"

Row = tuple[Any, ...]
"""One record that won its key, as the source table's columns up to ``_first_seen_at``: the declared values,
``_key``, ``_extra`` (JSON text), ``_url``, ``_content_hash``, ``_fetched_at``, ``_first_seen_at``."""

_Won = tuple[datetime, int, str, bytes]
"""The record that won its key so far: fetched_at, line, content hash, its :data:`Row` as a rows-file line."""
_BATCH = 5000  # rows joined per write to the rows file
# COPY text format: these characters in a value are written as escapes.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


@dataclass(slots=True)
class Prepared:
    """One part decoded, validated, deduplicated and encoded for PostgreSQL (built off the event loop).

    Small and picklable: the records that won their keys (latest ``fetched_at``
    in the part), sorted by key, are in two files the preparing process wrote:
    ``compare_path``, COPY text rows of ``_COMPARE_COLS`` (index, key, content
    hash, fetched_at, line), and ``rows_path``, one COPY CSV row per record
    (:data:`Row`'s columns) starting at ``offsets[i]`` (``offsets`` has one more
    entry, the file's size). ``newlines``: some row holds a raw newline (inside
    quotes), so rows cannot be told apart by newlines. ``rejects`` are
    ``_rejects`` rows; ``slow`` counts the lines the compiled path handed to the
    Python validator.
    """

    part: StagedPart
    rows: int
    loaded: int = 0
    """How many records won their keys (one row each in ``_lineage``)."""
    compare_path: str = ""
    rows_path: str = ""
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    newlines: bool = False
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

    def discard(self) -> None:
        """Remove its files (idempotent)."""
        for path in (self.compare_path, self.rows_path):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


# COPY options of the rows file: JSON's string escapes \" and \\ are CSV ones with this ESCAPE.
COPY_CSV: Mapping[str, str] = {"format": "csv", "null": "null", "escape": "\\"}
_CHUNK = 1 << 20  # gzip input inflated, and rows files read, this many bytes at a time


def csv_value(v: Any) -> bytes:
    """One value as a field of the rows file (exact for anything: raw newlines stay inside quotes)."""
    if v is None:
        return b"null"
    if type(v) is str:
        return b'"' + v.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'
    if type(v) is float and not math.isfinite(v):
        return b"NaN" if v != v else (b"Infinity" if v > 0 else b"-Infinity")
    return _json(v)


_json = msgspec.json.Encoder().encode


def csv_row(row: Sequence[Any]) -> bytes:
    """A row of the rows file the exact way (per value: for the rows :func:`encode_row` cannot take)."""
    return b",".join([csv_value(v) for v in row])


def encode_row(row: Sequence[Any]) -> bytes:
    """A :data:`Row` as a line of the rows file: one msgspec call, its JSON array's brackets cut off."""
    line = _json(row)
    # A JSON escape CSV does not know (\n, \t, \u0001, ...; it knows \\ and \"): the row is written the exact way.
    if b"\\" in line and b"\\" in line.replace(b"\\\\", b"").replace(b'\\"', b""):
        return csv_row(row)
    return line[1:-1]


def encode_row_checked(row: Sequence[Any]) -> bytes:
    """:func:`encode_row` for rows from the Python rules, whose floats may not be finite (JSON has no NaN)."""
    if any(type(v) is float and not math.isfinite(v) for v in row):
        return csv_row(row)
    return encode_row(row)


async def copy_rows(
    prepared: Prepared, which: Sequence[int] | None, tail: bytes = b"", *, chunk: int = _CHUNK
) -> AsyncIterator[bytes]:
    """The rows file's rows at these indexes (None: all) as COPY data, ``tail`` appended to each row.

    Read a chunk at a time (in a thread: file reads block): the loader never
    holds a part's rows. All rows with no raw newline in them: the file as it
    is, each newline given the tail in one bytes call. Otherwise rows are cut
    out by their offsets.
    """
    offsets = prepared.offsets
    f = await asyncio.to_thread(open, prepared.rows_path, "rb")
    try:
        end = b"," + tail + b"\n" if tail else b"\n"
        if which is None and not prepared.newlines:
            while block := await asyncio.to_thread(f.read, chunk):
                yield block.replace(b"\n", end) if tail else block
            return
        if which is None:
            which = range(len(offsets) - 1)
        i, n = 0, len(which)
        while i < n:
            # A window of the file that holds at most about a chunk: the rows from which[i] on that end in it.
            lo = offsets[which[i]]
            j = i + 1
            while j < n and offsets[which[j] + 1] - lo <= chunk:
                j += 1
            block = await asyncio.to_thread(_read_at, f, lo, offsets[which[j - 1] + 1] - lo)
            yield b"".join([block[offsets[k] - lo : offsets[k + 1] - lo - 1] + end for k in which[i:j]])
            i = j
    finally:
        await asyncio.to_thread(f.close)


def _read_at(f: BinaryIO, at: int, size: int) -> bytes:
    f.seek(at)
    return f.read(size)


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

    def prepare(self, gz: bytes, part: StagedPart, out_dir: str) -> Prepared:
        """Decode, validate, deduplicate and encode one staged (gzip) part into files in ``out_dir``.

        CPU only: runs off the event loop, in a decoding process or a thread.
        """
        prepared = Prepared(part, 0)
        latest: dict[str, _Won] = {}
        strict, lenient, astuple = self._strict.decode, self._lenient.decode, msgspec.structs.astuple
        encode = encode_row  # each record's row becomes bytes at once: no part's worth of Python tuples
        slow, needs_data = self._slow, self._needs_data
        declared = self._declared
        n = 0
        for line in _lines(gz, part):
            n += 1
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
                exact = False  # a value from the Python rules that JSON cannot hold (NaN, infinity)
                for i, name, always, validator in slow:
                    if always or type(values[i]) is str:
                        [values[i]], reasons = validator(data_ if data_ is not None else {name: values[i]})
                        if reasons:
                            break
                        exact = exact or (type(values[i]) is float and not math.isfinite(values[i]))
                if reasons:
                    prepared.slow += 1
                    self._python(line, n, part, prepared, latest)  # every reason, the compiled fields' too
                    continue
                row = (*values, key, extra, env.url, env.content_hash, fetched, fetched)
                prev = latest.get(key)
                if prev is None or fetched >= prev[0]:  # the latest fetched_at wins within the part
                    latest[key] = (fetched, n, env.content_hash, csv_row(row) if exact else encode(row))
                continue
            row = (*astuple(env.data), key, extra, env.url, env.content_hash, fetched, fetched)
            prev = latest.get(key)
            if prev is None or fetched >= prev[0]:  # the latest fetched_at wins within the part
                latest[key] = (fetched, n, env.content_hash, encode(row))
        if n != part.rows:
            raise StagingError(f"{part.uri}: has {n} lines but the manifest says {part.rows}")
        prepared.rows = n
        self._write(latest, prepared, out_dir)
        return prepared

    @staticmethod
    def _write(latest: dict[str, _Won], prepared: Prepared, out_dir: str) -> None:
        """The winning records in key order (the table's and the lineage index's order): COPY text and CSV files."""
        keys = sorted(latest)
        prepared.loaded = len(keys)
        if not keys:
            return
        stem = os.path.join(out_dir, f"{os.getpid()}-{next(_SERIAL)}")
        prepared.compare_path, prepared.rows_path = stem + ".compare", stem + ".rows"
        offsets = prepared.offsets
        offsets.append(0)
        at = 0
        seen_at: datetime | None = None
        with open(prepared.compare_path, "wb") as cmp, open(prepared.rows_path, "wb") as rows:
            for start in range(0, len(keys), _BATCH):
                batch = keys[start : start + _BATCH]
                won = [latest.pop(k) for k in batch]  # freed as written
                hashes = [r[2] for r in won]
                # Keys and hashes are written as they are unless one of them needs COPY's escapes.
                if _COPY_SPECIAL.search("".join(batch)):
                    batch = [k.translate(_COPY_ESCAPES) for k in batch]
                if _COPY_SPECIAL.search("".join(hashes)):
                    hashes = [h.translate(_COPY_ESCAPES) for h in hashes]
                cmp.write(
                    "".join(
                        [
                            f"{i}\t{k}\t{h}\t{r[0].isoformat()}\t{r[1]}\n"
                            for i, k, h, r in zip(range(start, start + len(won)), batch, hashes, won, strict=True)
                        ]
                    ).encode()
                )
                lines = [r[3] for r in won]
                block = b"\n".join(lines) + b"\n"
                # A raw newline inside a row (quoted, from a value written the exact way): rows go by offsets.
                prepared.newlines = prepared.newlines or block.count(b"\n") != len(lines)
                rows.write(block)
                for line in lines:
                    at += len(line) + 1
                    offsets.append(at)
                latest_fetch = max(r[0] for r in won)
                seen_at = latest_fetch if seen_at is None else max(seen_at, latest_fetch)
        prepared.seen_at = seen_at

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
            latest[key] = (fetched, n, content_hash, encode_row_checked(row))


def _lines(gz: bytes, part: StagedPart) -> Iterator[bytes]:
    """A staged part's non-empty lines, inflated a chunk at a time (never the whole part's JSON at once)."""
    unzip = zlib.decompressobj(31)
    rest = b""
    try:
        for at in range(0, len(gz), _CHUNK // 4):
            block = rest + unzip.decompress(gz[at : at + _CHUNK // 4])
            lines = block.split(b"\n")
            rest = lines.pop()
            yield from (line for line in lines if line)
        block = rest + unzip.flush()
    except zlib.error as exc:
        raise StagingError(f"{part.uri}: not a gzip part: {exc}") from None
    if not unzip.eof:
        raise StagingError(f"{part.uri}: truncated gzip part")
    yield from (line for line in block.split(b"\n") if line)


_SERIAL = iter(range(1, 1 << 62))
# The decoding process keeps the decoders of the manifests it is working on (their rules compiled once).
_DECODERS: dict[str, PartDecoder] = {}
# The directories it wrote parts into: removed when the loader that owns them is gone.
_OUT_DIRS: set[str] = set()


def watch_loader(pid: int) -> None:
    """In a decoding process: exit once the loader that started it is gone (it cannot shut its pool down then)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                for d in list(_OUT_DIRS):  # its prepared parts: nobody will read them now
                    shutil.rmtree(d, ignore_errors=True)
                os._exit(0)
            except PermissionError:  # exists, another user's: not ours, but alive
                pass

    threading.Thread(target=watch, name="trawl-watch-loader", daemon=True).start()


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM, its own address space's; 0 where /proc has none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def prepare_part(spec: tuple[Any, ...], gz: bytes, part: StagedPart, out_dir: str) -> Prepared:
    """A part prepared in the decoding process; ``spec`` is :class:`PartDecoder`'s arguments (picklable)."""
    _OUT_DIRS.add(out_dir)
    cache_key = repr(spec)
    decoder = _DECODERS.get(cache_key)
    if decoder is None:
        if len(_DECODERS) >= 4:
            _DECODERS.pop(next(iter(_DECODERS)))
        decoder = _DECODERS[cache_key] = PartDecoder(*spec)
    t = time.perf_counter()
    prepared = decoder.prepare(gz, part, out_dir)
    prepared.seconds = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    prepared.peak_rss_mb = _peak_rss_mb() or usage.ru_maxrss / 1024
    prepared.cpu_s = usage.ru_utime + usage.ru_stime
    prepared.pid = os.getpid()
    return prepared
