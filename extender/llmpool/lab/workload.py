"""Workloads for the lab: trace loaders and a synthetic workload generator.

A :class:`Workload` is a list of :class:`WorkloadItem`: the :class:`Request` the router
sees on arrival plus the hidden ground truth the simulated engine needs (how many
output tokens it will generate). Arrival times are seconds, the first request arrives
at ``t = 0.0`` and request ids run ``0..n-1`` in arrival order.

Two sources:

* :func:`load_trace` reads public request traces (Azure LLM inference 2023 and 2024,
  Mooncake, BurstGPT) and ShareGPT length pairs (no timestamps: Poisson arrivals).
  The format is detected from the file's content; gzip and xz compression are
  handled transparently. Rows are never dropped silently: malformed rows raise a
  :class:`WorkloadError` naming ``file:line`` and the field, and rows that have to be
  adjusted to be replayable (zero-token prompts or responses, out-of-order
  timestamps) are kept and counted in :attr:`Workload.notes`.
* :func:`synthetic` generates a workload from a :class:`SyntheticSpec`, vectorised with
  numpy and deterministic for a seed. :data:`SYNTHETIC_SPECS` holds the built-in
  specs; they are the project's embedded default, so everything runs with no data.

:func:`load_workload` is the single entry point for the CLI: a synthetic spec name or
a trace path, an optional request count and an optional mean arrival rate.
See ``docs/workloads.md``.
"""

from __future__ import annotations

import csv
import gc
import gzip
import io
import itertools
import json
import lzma
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

from llmpool.routing.types import Request

__all__ = [
    "CONVERSATION",
    "FIVE_TASK_MIX",
    "FORMATS",
    "PREFIX_SHARING",
    "SYNTHETIC_SPECS",
    "LengthDist",
    "PrefixSpec",
    "RequestClass",
    "SyntheticSpec",
    "Workload",
    "WorkloadError",
    "WorkloadItem",
    "detect_format",
    "load_trace",
    "load_workload",
    "synthetic",
]

#: Trace formats :func:`load_trace` understands (the names the CLI uses).
FORMATS: Final[tuple[str, ...]] = ("azure2023", "azure2024", "mooncake", "burstgpt", "sharegpt")

_AZURE_COLUMNS: Final = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT_COLUMNS: Final = ("Timestamp", "Model", "Request tokens", "Response tokens")
_SHAREGPT_COLUMNS: Final = ("num_prefill_tokens", "num_decode_tokens")
_MOONCAKE_KEYS: Final = ("timestamp", "input_length", "output_length")
_MOONCAKE_BLOCK_TOKENS: Final = 512

_GZIP_MAGIC: Final = b"\x1f\x8b"
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"


class WorkloadError(ValueError):
    """A workload could not be loaded or built.

    ``str()`` is one line that names the file (and the line, for a bad row), e.g.
    ``trace.csv:17: GeneratedTokens is not an integer: 'x'``.
    """


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: str, limit: int = 40) -> str:
    """A field value for an error message: quoted, escaped, shortened."""
    if len(value) > limit:
        return repr(value[:limit]) + "..."
    return repr(value)


@contextmanager
def _bulk() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects.

    Building a million requests otherwise spends most of its time in collections
    that cannot free anything.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ----------------------------------------------------------------------------- data model


@dataclass(slots=True)
class WorkloadItem:
    """One request of a workload."""

    request: Request  # what the router sees
    output_tokens: int  # hidden ground truth: tokens the engine will generate (>= 1)


@dataclass(slots=True)
class Workload:
    """Requests sorted by arrival; the first arrives at 0.0; ids are ``0..n-1`` in order.

    ``source`` is the file path or ``synthetic:<spec name>``; ``notes`` records every
    adjustment made to the source data (zero-token rows replayed as one token,
    re-sorted timestamps, rescaling, windowing).
    """

    name: str
    items: list[WorkloadItem]
    source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def mean_rate(self) -> float:
        """``(n - 1) / (last arrival - first arrival)`` in requests per second.

        0.0 for fewer than two requests; ``inf`` if all arrivals share one timestamp.
        """
        n = len(self.items)
        if n < 2:
            return 0.0
        span = self.items[-1].request.arrival - self.items[0].request.arrival
        return (n - 1) / span if span > 0 else math.inf

    def duration(self) -> float:
        """Seconds from the first to the last arrival (0.0 when empty)."""
        if not self.items:
            return 0.0
        return self.items[-1].request.arrival - self.items[0].request.arrival

    def with_rate(self, rate: float) -> Workload:
        """A copy whose timestamps are scaled so that :meth:`mean_rate` equals ``rate``.

        Scaling is linear in time, so the burst pattern (the ratios of inter-arrival
        times) is kept. New request objects; this workload is not modified. A workload
        of fewer than two requests is copied unchanged.
        """
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise WorkloadError(f"{self.source}: rate must be a positive number of requests/s, got {rate!r}")
        n = len(self.items)
        notes = list(self.notes)
        if n < 2:
            return Workload(self.name, [_copy_item(it) for it in self.items], self.source, notes)
        first = self.items[0].request.arrival
        span = self.items[-1].request.arrival - first
        if span <= 0:
            raise WorkloadError(
                f"{self.source}: cannot rescale to {rate:g} req/s: all {n} arrivals share one timestamp"
            )
        new_span = (n - 1) / rate
        old_rate = (n - 1) / span
        # (a - first) / span is exactly 1.0 for the last request, so it lands on new_span.
        with _bulk():
            items = [
                _copy_item(it, arrival=(it.request.arrival - first) / span * new_span) for it in self.items
            ]
        notes.append(f"time rescaled by {span / new_span:.6g}x: mean rate {old_rate:.6g} -> {rate:.6g} req/s")
        return Workload(self.name, items, self.source, notes)

    def window(
        self, start: float | None = None, end: float | None = None, limit: int | None = None
    ) -> Workload:
        """Keep arrivals in ``[start, end)``, then the first ``limit`` of them.

        Times are re-zeroed (the first kept request arrives at 0.0) and ids renumbered
        ``0..k-1``. New request objects; this workload is not modified. The result may
        be empty.
        """
        if limit is not None and limit < 0:
            raise WorkloadError(f"{self.source}: window limit must be >= 0, got {limit}")
        kept = [
            it
            for it in self.items
            if (start is None or it.request.arrival >= start) and (end is None or it.request.arrival < end)
        ]
        if limit is not None:
            kept = kept[:limit]
        t0 = kept[0].request.arrival if kept else 0.0
        with _bulk():
            items = [_copy_item(it, id=i, arrival=it.request.arrival - t0) for i, it in enumerate(kept)]
        notes = list(self.notes)
        if len(kept) != len(self.items) or t0 != 0.0:
            parts = []
            if start is not None or end is not None:
                lo = "" if start is None else f"{start:g}"
                hi = "" if end is None else f"{end:g}"
                parts.append(f"time window [{lo}, {hi}) s")
            if limit is not None:
                parts.append(f"limit {limit}")
            notes.append(f"{' and '.join(parts) or 'window'}: kept {len(kept)} of {len(self.items)} requests")
        return Workload(self.name, items, self.source, notes)


def _copy_item(item: WorkloadItem, *, arrival: float | None = None, id: int | None = None) -> WorkloadItem:
    req = item.request
    new = replace(
        req,
        id=req.id if id is None else id,
        arrival=req.arrival if arrival is None else arrival,
    )
    return WorkloadItem(new, item.output_tokens)


# ----------------------------------------------------------------------------- file access


def _check_path(path: Path) -> None:
    if not path.exists():
        raise WorkloadError(f"{path}: no such file")
    if path.is_dir():
        raise WorkloadError(f"{path}: is a directory, not a trace file")


def _open_text(path: Path) -> io.BufferedIOBase:
    """Open a (possibly gzip- or xz-compressed) file; compression from the magic bytes.

    Binary: :class:`_Lines` decodes line by line, so a decoding error names its line.
    """
    _check_path(path)
    try:
        with path.open("rb") as raw:
            head = raw.read(6)
        if head.startswith(_GZIP_MAGIC):
            return gzip.open(path, "rb")
        if head.startswith(_XZ_MAGIC):
            return lzma.open(path, "rb")
        return path.open("rb")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {_one_line(exc.strerror or str(exc))}") from None


class _Lines:
    """Iterate over a file's lines as UTF-8 text (a leading BOM dropped), counting them.

    Decoding and decompression errors become :class:`WorkloadError`.
    """

    def __init__(self, path: Path, stream: io.BufferedIOBase) -> None:
        self.path = path
        self.stream = stream
        self.lineno = 0

    def __iter__(self) -> Iterator[str]:
        try:
            for raw in self.stream:
                self.lineno += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise WorkloadError(f"{self.path}:{self.lineno}: not UTF-8 text") from None
                if self.lineno == 1:
                    line = line.removeprefix("\ufeff")
                yield line
        except (EOFError, OSError, lzma.LZMAError) as exc:
            raise WorkloadError(
                f"{self.path}: corrupt or truncated compressed data after line {self.lineno}: "
                f"{_one_line(str(exc))}"
            ) from None


def _first_lines(path: Path, count: int) -> list[tuple[int, str]]:
    """Up to ``count`` non-blank lines with their line numbers."""
    out: list[tuple[int, str]] = []
    with _open_text(path) as stream:
        lines = _Lines(path, stream)
        for line in lines:
            if line.strip():
                out.append((lines.lineno, line))
                if len(out) == count:
                    break
    return out


def _split_csv(path: Path, lineno: int, line: str) -> list[str]:
    try:
        return next(csv.reader([line]))
    except (csv.Error, StopIteration):
        raise WorkloadError(f"{path}:{lineno}: malformed CSV line") from None


# ----------------------------------------------------------------------------- format detection

# YYYY-MM-DD[ T]HH:MM:SS[.fraction][Z|+HH:MM|+HHMM]; any number of fractional digits.
_TS_RE: Final = re.compile(
    r"\s*(\d{4}-\d{2}-\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?\s*$"
)


def detect_format(path: str | Path) -> str:
    """The trace format of ``path``, one of :data:`FORMATS`, from the file's content.

    Looks at the header (CSV) or the first record (JSON lines), never the file name;
    gzip and xz compression are detected from the magic bytes. Azure 2023 and 2024
    share the header and differ in the timestamps: a time zone marks 2024.
    """
    p = Path(path).expanduser()
    first = _first_lines(p, 2)
    if not first:
        raise WorkloadError(f"{p}: no requests (empty file)")
    lineno, line = first[0]
    text = line.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{p}:{lineno}: invalid JSON: {exc.msg}") from None
        if isinstance(obj, dict) and all(k in obj for k in _MOONCAKE_KEYS):
            return "mooncake"
        raise WorkloadError(
            f"{p}:{lineno}: unrecognised JSON record (a Mooncake record needs keys "
            f"{', '.join(_MOONCAKE_KEYS)}); known formats: {', '.join(FORMATS)}"
        )
    header = [h.strip() for h in _split_csv(p, lineno, line)]
    columns = set(header)
    if columns.issuperset(_AZURE_COLUMNS):
        if len(first) < 2:
            return "azure2023"  # header only: the two variants parse identically
        row = _split_csv(p, first[1][0], first[1][1])
        col = header.index("TIMESTAMP")
        match = _TS_RE.match(row[col]) if col < len(row) else None
        return "azure2024" if match is not None and match.group(6) else "azure2023"
    if columns.issuperset(_BURSTGPT_COLUMNS):
        return "burstgpt"
    if columns.issuperset(_SHAREGPT_COLUMNS):
        return "sharegpt"
    raise WorkloadError(
        f"{p}:{lineno}: unrecognised trace format (header {_show(text, 60)}); "
        f"known formats: {', '.join(FORMATS)}"
    )


# ----------------------------------------------------------------------------- row parsing


class _Columns:
    """What a loader extracts: one entry per row, in file order."""

    __slots__ = ("arrivals", "hashes", "models", "outputs", "prompts", "tasks")

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.prompts: list[int] = []
        self.outputs: list[int] = []
        self.models: list[str] | None = None
        self.tasks: list[str] | None = None
        self.hashes: list[tuple[int, ...]] | None = None


def _parse_count(path: Path, lineno: int, name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        if not text.strip():
            raise WorkloadError(f"{path}:{lineno}: {name} is empty") from None
        raise WorkloadError(f"{path}:{lineno}: {name} is not an integer: {_show(text)}") from None
    if value < 0:
        raise WorkloadError(f"{path}:{lineno}: {name} is negative: {value}")
    return value


def _parse_seconds(path: Path, lineno: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        if not text.strip():
            raise WorkloadError(f"{path}:{lineno}: {name} is empty") from None
        raise WorkloadError(f"{path}:{lineno}: {name} is not a number: {_show(text)}") from None
    if not math.isfinite(value):
        raise WorkloadError(f"{path}:{lineno}: {name} is not finite: {_show(text)}")
    return value


class _TimestampParser:
    """ISO-like timestamps to seconds relative to the first one parsed.

    Keeps any number of fractional digits (Azure 2023 has 7: ``datetime.fromisoformat``
    truncates them to microseconds on Python 3.11 and rejects them before) and takes an
    optional time zone (Azure 2024: ``+00:00``; naive times are read as UTC). Naive and
    zoned timestamps must not be mixed within a file.
    Day and second-of-day are kept apart so float precision is not lost to the epoch.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._days: dict[str, int] = {}
        self._day0: int | None = None
        self._sec0 = 0.0
        self._zoned: bool | None = None

    def __call__(self, lineno: int, text: str) -> float:
        m = _TS_RE.match(text)
        if m is None:
            if not text.strip():
                raise WorkloadError(f"{self.path}:{lineno}: {self.name} is empty")
            raise WorkloadError(f"{self.path}:{lineno}: {self.name} is not a timestamp: {_show(text)}")
        day_text, hh, mm, ss, frac, zone = m.groups()
        day = self._days.get(day_text)
        if day is None:
            try:
                day = date.fromisoformat(day_text).toordinal()
            except ValueError:
                raise WorkloadError(
                    f"{self.path}:{lineno}: {self.name} has an invalid date: {_show(text)}"
                ) from None
            self._days[day_text] = day
        h, mi, s = int(hh), int(mm), int(ss)
        if h > 23 or mi > 59 or s > 60:
            raise WorkloadError(f"{self.path}:{lineno}: {self.name} has an invalid time: {_show(text)}")
        seconds = h * 3600 + mi * 60 + s + (float("0." + frac) if frac else 0.0)
        zoned = zone is not None
        if zone is not None and zone != "Z":
            digits = zone[1:].replace(":", "")
            offset = int(digits[:2]) * 3600 + int(digits[2:]) * 60
            seconds -= offset if zone[0] == "+" else -offset
        if self._day0 is None:
            self._day0, self._sec0, self._zoned = day, seconds, zoned
            return 0.0
        if zoned is not self._zoned:
            raise WorkloadError(
                f"{self.path}:{lineno}: {self.name} mixes time-zone-aware and naive timestamps: {_show(text)}"
            )
        return (day - self._day0) * 86400.0 + (seconds - self._sec0)


class _CsvRows:
    """Header-driven CSV reading: yields (line number, row) with the row's width checked."""

    def __init__(self, path: Path, lines: _Lines, fmt: str, required: tuple[str, ...]) -> None:
        self.path = path
        self.reader = csv.reader(_skip_blank(lines))
        self.lines = lines
        try:
            header = next(self.reader, None)
        except csv.Error as exc:
            raise WorkloadError(f"{path}:{lines.lineno}: malformed CSV: {_one_line(str(exc))}") from None
        if header is None:
            raise WorkloadError(f"{path}: no requests (empty file)")
        self.header = [h.strip() for h in header]
        for name in required:
            if name not in self.header:
                raise WorkloadError(
                    f"{path}:{lines.lineno}: header has no column {name!r} (format {fmt} needs "
                    f"{', '.join(required)})"
                )
        self.width = len(self.header)

    def index(self, name: str) -> int:
        return self.header.index(name)

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        reader = self.reader
        width = self.width
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise WorkloadError(
                    f"{self.path}:{self.lines.lineno}: malformed CSV: {_one_line(str(exc))}"
                ) from None
            lineno = self.lines.lineno
            if len(row) != width:
                if len(row) < width:
                    missing = self.header[len(row)]
                    raise WorkloadError(
                        f"{self.path}:{lineno}: missing field {missing!r} (expected {width} fields, "
                        f"got {len(row)})"
                    )
                raise WorkloadError(f"{self.path}:{lineno}: expected {width} fields, got {len(row)}")
            yield lineno, row


def _skip_blank(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        if line.strip():
            yield line


def _load_azure(path: Path, lines: _Lines, fmt: str) -> _Columns:
    rows = _CsvRows(path, lines, fmt, _AZURE_COLUMNS)
    it, ic, ig = (rows.index(c) for c in _AZURE_COLUMNS)
    parse_ts = _TimestampParser(path, "TIMESTAMP")
    cols = _Columns()
    arrivals, prompts, outputs = cols.arrivals, cols.prompts, cols.outputs
    for lineno, row in rows:
        arrivals.append(parse_ts(lineno, row[it]))
        prompts.append(_parse_count(path, lineno, "ContextTokens", row[ic]))
        outputs.append(_parse_count(path, lineno, "GeneratedTokens", row[ig]))
    return cols


def _load_burstgpt(path: Path, lines: _Lines, fmt: str) -> _Columns:
    rows = _CsvRows(path, lines, fmt, _BURSTGPT_COLUMNS)
    it, im, ir, io = (rows.index(c) for c in _BURSTGPT_COLUMNS)
    il = rows.index("Log Type") if "Log Type" in rows.header else -1
    cols = _Columns()
    cols.models, cols.tasks = [], []
    for lineno, row in rows:
        cols.arrivals.append(_parse_seconds(path, lineno, "Timestamp", row[it]))
        model = row[im].strip()
        if not model:
            raise WorkloadError(f"{path}:{lineno}: Model is empty")
        cols.models.append(model)
        cols.prompts.append(_parse_count(path, lineno, "Request tokens", row[ir]))
        cols.outputs.append(_parse_count(path, lineno, "Response tokens", row[io]))
        cols.tasks.append(row[il].strip() if il >= 0 else "")
    return cols


def _load_sharegpt(path: Path, lines: _Lines, fmt: str) -> _Columns:
    rows = _CsvRows(path, lines, fmt, _SHAREGPT_COLUMNS)
    ip, id_ = (rows.index(c) for c in _SHAREGPT_COLUMNS)
    cols = _Columns()
    for lineno, row in rows:
        cols.prompts.append(_parse_count(path, lineno, "num_prefill_tokens", row[ip]))
        cols.outputs.append(_parse_count(path, lineno, "num_decode_tokens", row[id_]))
    return cols


def _json_count(path: Path, lineno: int, name: str, value: object) -> int:
    if value is None:
        raise WorkloadError(f"{path}:{lineno}: missing field {name!r}")
    if type(value) is not int:
        raise WorkloadError(f"{path}:{lineno}: {name} is not an integer: {_show(json.dumps(value))}")
    if value < 0:
        raise WorkloadError(f"{path}:{lineno}: {name} is negative: {value}")
    return value


def _load_mooncake(path: Path, lines: _Lines, fmt: str) -> _Columns:
    cols = _Columns()
    cols.hashes = []
    decode = json.JSONDecoder().decode
    for line in lines:
        text = line.strip()
        if not text:
            continue
        lineno = lines.lineno
        try:
            rec = decode(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise WorkloadError(f"{path}:{lineno}: record is not a JSON object")
        ts = rec.get("timestamp")
        if ts is None:
            raise WorkloadError(f"{path}:{lineno}: missing field 'timestamp'")
        if type(ts) not in (int, float) or not math.isfinite(ts):
            raise WorkloadError(f"{path}:{lineno}: timestamp is not a number: {_show(json.dumps(ts))}")
        cols.arrivals.append(ts / 1000.0)
        cols.prompts.append(_json_count(path, lineno, "input_length", rec.get("input_length")))
        cols.outputs.append(_json_count(path, lineno, "output_length", rec.get("output_length")))
        hash_ids = rec.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(type(h) is int for h in hash_ids):
            raise WorkloadError(f"{path}:{lineno}: hash_ids is not a list of integers")
        cols.hashes.append(tuple(hash_ids))
    return cols


def _trace_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".xz", ".csv", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or path.name


def _poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> NDArray[np.float64]:
    arrivals = np.zeros(n, dtype=np.float64)
    if n > 1:
        np.cumsum(rng.exponential(1.0 / rate, n - 1), out=arrivals[1:])
    return arrivals


def load_trace(
    path: str | Path,
    *,
    fmt: str | None = None,
    model: str = "default",
    seed: int = 0,
    rate_if_untimed: float = 1.0,
) -> Workload:
    """Load a request trace as a :class:`Workload`.

    ``fmt`` is one of :data:`FORMATS`; by default it is detected from the content.
    ``model`` fills :attr:`Request.model` (BurstGPT carries its own ``Model`` column).
    Formats without timestamps (``sharegpt``) get Poisson arrivals at
    ``rate_if_untimed`` requests/s drawn with ``seed``.

    Every row becomes a request. Rows with 0 prompt or 0 output tokens are replayed
    with 1 token, and out-of-order timestamps are sorted (stable); both are recorded in
    :attr:`Workload.notes`. Malformed rows raise :class:`WorkloadError` naming
    ``file:line`` and the field.
    """
    p = Path(path).expanduser()
    if fmt is None:
        fmt = detect_format(p)
    elif fmt not in FORMATS:
        raise WorkloadError(f"{p}: unknown trace format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if fmt == "sharegpt" and not (math.isfinite(rate_if_untimed) and rate_if_untimed > 0):
        raise WorkloadError(f"{p}: rate_if_untimed must be a positive number, got {rate_if_untimed!r}")
    with _bulk(), _open_text(p) as stream:
        lines = _Lines(p, stream)
        if fmt in ("azure2023", "azure2024"):
            cols = _load_azure(p, lines, fmt)
        elif fmt == "burstgpt":
            cols = _load_burstgpt(p, lines, fmt)
        elif fmt == "sharegpt":
            cols = _load_sharegpt(p, lines, fmt)
        else:
            cols = _load_mooncake(p, lines, fmt)
    notes: list[str] = []
    if fmt == "sharegpt" and cols.prompts:
        rng = np.random.default_rng(seed)
        cols.arrivals = _poisson_arrivals(len(cols.prompts), rate_if_untimed, rng).tolist()
        notes.append(f"no timestamps: Poisson arrivals at {rate_if_untimed:g} req/s (seed {seed})")
    names = {
        "azure2023": ("ContextTokens", "GeneratedTokens"),
        "azure2024": ("ContextTokens", "GeneratedTokens"),
        "burstgpt": ("Request tokens", "Response tokens"),
        "sharegpt": ("num_prefill_tokens", "num_decode_tokens"),
        "mooncake": ("input_length", "output_length"),
    }[fmt]
    with _bulk():
        return _assemble(_trace_name(p), str(p), cols, notes, model, names)


def _assemble(
    name: str,
    source: str,
    cols: _Columns,
    notes: list[str],
    model: str,
    field_names: tuple[str, str],
) -> Workload:
    n = len(cols.prompts)
    if n == 0:
        raise WorkloadError(f"{source}: no requests")
    prompts, outputs = cols.prompts, cols.outputs
    zero_prompt = prompts.count(0)
    if zero_prompt:
        prompts = [max(v, 1) for v in prompts]
        notes.append(f"{zero_prompt} rows had 0 {field_names[0]}; replayed as 1-token prompts")
    zero_output = outputs.count(0)
    if zero_output:
        outputs = [max(v, 1) for v in outputs]
        notes.append(f"{zero_output} rows had 0 {field_names[1]}; replayed as 1-token responses")
    arrivals = cols.arrivals
    back = [b - a for a, b in itertools.pairwise(arrivals) if b < a]
    if back:
        order = sorted(range(n), key=arrivals.__getitem__)  # stable: ties keep file order
        notes.append(
            f"{len(back)} rows arrived before the row above them (largest step back "
            f"{-min(back):.6g} s); sorted by arrival (stable)"
        )
    else:
        order = list(range(n))
    t0 = arrivals[order[0]]
    models = cols.models
    tasks = cols.tasks
    hashes = cols.hashes
    items: list[WorkloadItem] = []
    append = items.append
    for new_id, i in enumerate(order):
        req = Request(
            id=new_id,
            arrival=arrivals[i] - t0,
            prompt_tokens=prompts[i],
            model=models[i] if models is not None else model,
            task=tasks[i] if tasks is not None else "",
            prefix_hashes=hashes[i] if hashes is not None else (),
            hash_block_tokens=_MOONCAKE_BLOCK_TOKENS,
        )
        append(WorkloadItem(req, outputs[i]))
    return Workload(name, items, source, notes)


# ----------------------------------------------------------------------------- synthetic


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[clip(X, low, high)] for X ~ LogNormal(mu, sigma)."""
    a = (math.log(low) - mu) / sigma
    b = (math.log(high) - mu) / sigma
    body = math.exp(mu + sigma * sigma / 2.0) * (_phi(b - sigma) - _phi(a - sigma))
    return low * _phi(a) + body + high * (1.0 - _phi(b))


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution; samples are integers clipped to ``[low, high]``.

    * ``lognormal``: ``mean`` is the mean *after* clipping (the lognormal's location
      is solved for it, so a cap does not drag the mean down); ``cv`` is the
      coefficient of variation of the unclipped lognormal (0 gives ``fixed``).
    * ``uniform``: uniform on ``mean ± sqrt(3)·cv·mean`` (which has that mean and
      cv); the range must lie inside ``[low, high]``.
    * ``fixed``: always ``round(mean)``.
    """

    kind: Literal["lognormal", "fixed", "uniform"]
    mean: float
    cv: float = 0.0
    low: int = 1
    high: int = 32768

    def __post_init__(self) -> None:
        if self.kind not in ("lognormal", "fixed", "uniform"):
            raise ValueError(f"LengthDist kind must be lognormal, fixed or uniform, got {self.kind!r}")
        if not (1 <= self.low <= self.high):
            raise ValueError(f"LengthDist needs 1 <= low <= high, got low={self.low} high={self.high}")
        if not (math.isfinite(self.mean) and self.low <= self.mean <= self.high):
            raise ValueError(f"LengthDist mean {self.mean!r} outside [low, high] = [{self.low}, {self.high}]")
        if not (math.isfinite(self.cv) and self.cv >= 0):
            raise ValueError(f"LengthDist cv must be >= 0, got {self.cv!r}")
        if self.kind == "lognormal" and self.cv > 0 and not (self.low < self.mean < self.high):
            raise ValueError(f"lognormal LengthDist mean {self.mean} must lie strictly inside (low, high)")
        if self.kind == "uniform":
            half = math.sqrt(3.0) * self.cv * self.mean
            if self.mean - half < self.low or self.mean + half > self.high:
                raise ValueError(
                    f"uniform LengthDist mean {self.mean} cv {self.cv} spans "
                    f"[{self.mean - half:g}, {self.mean + half:g}], outside [{self.low}, {self.high}]"
                )

    def lognormal_params(self) -> tuple[float, float]:
        """(mu, sigma) of the underlying lognormal, mu solved so the clipped mean is ``mean``."""
        sigma = math.sqrt(math.log1p(self.cv * self.cv))
        if sigma == 0.0:
            return math.log(self.mean), 0.0
        lo = math.log(self.low) - 10.0 * sigma - 10.0
        hi = math.log(self.high) + 10.0 * sigma + 10.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if _clipped_lognormal_mean(mid, sigma, self.low, self.high) < self.mean:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12:
                break
        return 0.5 * (lo + hi), sigma

    def sample(self, rng: np.random.Generator, size: int) -> NDArray[np.int64]:
        """``size`` integer lengths."""
        if self.kind == "fixed" or self.cv == 0.0:
            x = np.full(size, float(self.mean))
        elif self.kind == "uniform":
            half = math.sqrt(3.0) * self.cv * self.mean
            x = rng.uniform(self.mean - half, self.mean + half, size)
        else:
            mu, sigma = self.lognormal_params()
            x = rng.lognormal(mu, sigma, size)
        out: NDArray[np.int64] = np.clip(np.rint(x), self.low, self.high).astype(np.int64)
        return out


@dataclass(frozen=True)
class RequestClass:
    """A kind of request (``Request.task`` is its name) and its share of the traffic."""

    name: str
    weight: float
    prompt: LengthDist
    output: LengthDist

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"RequestClass {self.name!r} weight must be positive, got {self.weight!r}")


@dataclass(frozen=True)
class PrefixSpec:
    """Shared-prefix structure: system prompts or documents common to groups of requests.

    Each request picks a group with Zipf(``zipf_s``) popularity (group 0 the most
    popular). Its first ``shared_blocks`` prefix hashes are its group's; the rest of its
    prompt blocks (``ceil(prompt_tokens / block_tokens)`` in all, the Mooncake
    convention) get globally unique hashes. The shared part is added to the sampled
    prompt length, so ``prompt_tokens >= shared_blocks * block_tokens``.
    """

    groups: int
    shared_blocks: int
    block_tokens: int = 512
    zipf_s: float = 1.0

    def __post_init__(self) -> None:
        if self.groups < 1 or self.shared_blocks < 0 or self.block_tokens < 1:
            raise ValueError(
                f"PrefixSpec needs groups >= 1, shared_blocks >= 0, block_tokens >= 1; got {self!r}"
            )
        if not (math.isfinite(self.zipf_s) and self.zipf_s >= 0):
            raise ValueError(f"PrefixSpec zipf_s must be >= 0, got {self.zipf_s!r}")


@dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic workload: a mix of request classes, an arrival process, prefixes.

    ``arrival`` is ``poisson`` (exponential inter-arrival times) or ``gamma``
    (inter-arrival times gamma-distributed with shape ``1/arrival_cv**2``: cv > 1 is
    burstier than Poisson, cv < 1 smoother).
    """

    name: str
    classes: tuple[RequestClass, ...]
    arrival: Literal["poisson", "gamma"] = "poisson"
    arrival_cv: float = 1.0
    prefix: PrefixSpec | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError(f"SyntheticSpec {self.name!r} has no request classes")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"SyntheticSpec arrival must be poisson or gamma, got {self.arrival!r}")
        if not (math.isfinite(self.arrival_cv) and self.arrival_cv > 0):
            raise ValueError(f"SyntheticSpec arrival_cv must be positive, got {self.arrival_cv!r}")


def synthetic(spec: SyntheticSpec, *, n: int, rate: float, seed: int) -> Workload:
    """``n`` requests drawn from ``spec`` arriving at ``rate`` requests/s on average.

    Deterministic for a seed. ``rate`` is the rate of the arrival process, so the
    realised :meth:`Workload.mean_rate` fluctuates around it (use
    :meth:`Workload.with_rate` for an exact rate). ``Request.task`` is the class name.
    """
    source = f"synthetic:{spec.name}"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise WorkloadError(f"{source}: n must be a positive number of requests, got {n!r}")
    if not (math.isfinite(rate) and rate > 0):
        raise WorkloadError(f"{source}: rate must be a positive number of requests/s, got {rate!r}")
    with _bulk():
        return _synthetic(spec, source, n, rate, seed)


def _synthetic(spec: SyntheticSpec, source: str, n: int, rate: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    weights = np.array([c.weight for c in spec.classes], dtype=np.float64)
    cls = rng.choice(len(spec.classes), size=n, p=weights / weights.sum())
    prompts = np.empty(n, dtype=np.int64)
    outputs = np.empty(n, dtype=np.int64)
    for k, rc in enumerate(spec.classes):
        idx = np.flatnonzero(cls == k)
        prompts[idx] = rc.prompt.sample(rng, idx.size)
        outputs[idx] = rc.output.sample(rng, idx.size)

    hashes: list[tuple[int, ...]] | None = None
    block_tokens = _MOONCAKE_BLOCK_TOKENS
    if spec.prefix is not None:
        px = spec.prefix
        block_tokens = px.block_tokens
        pop = 1.0 / np.arange(1, px.groups + 1, dtype=np.float64) ** px.zipf_s
        groups = rng.choice(px.groups, size=n, p=pop / pop.sum())
        prompts += px.shared_blocks * px.block_tokens
        blocks = -(-prompts // px.block_tokens)  # ceil
        unique = blocks - px.shared_blocks
        # Shared ids: group g, position j -> g * shared_blocks + j. Unique ids follow.
        first_unique = px.groups * px.shared_blocks + np.concatenate(([0], np.cumsum(unique)[:-1]))
        shared = [tuple(range(g * px.shared_blocks, (g + 1) * px.shared_blocks)) for g in range(px.groups)]
        hashes = [
            shared[g] + tuple(range(u0, u0 + u))
            for g, u0, u in zip(groups.tolist(), first_unique.tolist(), unique.tolist(), strict=True)
        ]

    arrivals = np.zeros(n, dtype=np.float64)
    if n > 1:
        if spec.arrival == "gamma":
            shape = 1.0 / spec.arrival_cv**2
            gaps = rng.gamma(shape, 1.0 / (rate * shape), n - 1)
        else:
            gaps = rng.exponential(1.0 / rate, n - 1)
        np.cumsum(gaps, out=arrivals[1:])

    names = [c.name for c in spec.classes]
    arr = arrivals.tolist()
    pr = prompts.tolist()
    out = outputs.tolist()
    task = [names[k] for k in cls.tolist()]
    if hashes is None:
        items = [
            WorkloadItem(Request(id=i, arrival=arr[i], prompt_tokens=pr[i], task=task[i]), out[i])
            for i in range(n)
        ]
    else:
        items = [
            WorkloadItem(
                Request(
                    id=i,
                    arrival=arr[i],
                    prompt_tokens=pr[i],
                    task=task[i],
                    prefix_hashes=hashes[i],
                    hash_block_tokens=block_tokens,
                ),
                out[i],
            )
            for i in range(n)
        ]
    return Workload(spec.name, items, source, [])


def _lognormal(mean: float, cv: float, high: int = 32768) -> LengthDist:
    return LengthDist("lognormal", mean, cv, 1, high)


# Paper (a), Table 1 (algorithms.md A.5): samples, average prompt, average decode.
# Prompt cv 0.5 and decode cv 0.9: prompts of one task follow one template around
# inputs of similar size; decode lengths of open-ended answers spread widely.
# Prompts are capped at 1000 tokens as in the paper, decodes at 4096 (Llama-2 context).
FIVE_TASK_MIX: Final = SyntheticSpec(
    name="five-task",
    classes=(
        RequestClass("books", 7351, _lognormal(29.09, 0.5, 1000), _lognormal(61.76, 0.9, 4096)),
        RequestClass("eli5", 6988, _lognormal(29.83, 0.5, 1000), _lognormal(334.40, 0.9, 4096)),
        RequestClass("imdb", 6564, _lognormal(211.54, 0.5, 1000), _lognormal(142.53, 0.9, 4096)),
        RequestClass("squad", 7122, _lognormal(125.16, 0.5, 1000), _lognormal(220.02, 0.9, 4096)),
        RequestClass("wnut", 3304, _lognormal(26.41, 0.5, 1000), _lognormal(64.10, 0.9, 4096)),
    ),
)

# Azure 2024 conversation split as used in paper (b) (algorithms.md B.7): average
# prompt 4652, average output 1052. Arrivals slightly burstier than Poisson (the
# public Azure conversation trace has inter-arrival cv 1.09).
CONVERSATION: Final = SyntheticSpec(
    name="conversation",
    classes=(RequestClass("conversation", 1.0, _lognormal(4652, 1.0, 16384), _lognormal(1052, 0.6, 4096)),),
    arrival="gamma",
    arrival_cv=1.1,
)

# Chat behind shared system prompts / documents: 16 groups of 4 shared 512-token
# blocks (2048 tokens), Zipf(1.0) popularity, a per-request suffix around 600 tokens.
PREFIX_SHARING: Final = SyntheticSpec(
    name="prefix-sharing",
    classes=(RequestClass("chat", 1.0, _lognormal(600, 1.0, 8192), _lognormal(250, 0.8, 2048)),),
    prefix=PrefixSpec(groups=16, shared_blocks=4, block_tokens=512, zipf_s=1.0),
)

# Small enough for a CPU server and a small model (the sim-to-real check, the demo):
# short chat turns and longer document prompts, answers up to a few hundred tokens.
SMALL_MIX: Final = SyntheticSpec(
    name="small-mix",
    classes=(
        RequestClass(
            "chat", 0.6, LengthDist("lognormal", 120, 0.6, 16, 1024), LengthDist("lognormal", 96, 0.8, 8, 384)
        ),
        RequestClass(
            "document",
            0.4,
            LengthDist("lognormal", 700, 0.4, 128, 1536),
            LengthDist("lognormal", 48, 0.8, 8, 256),
        ),
    ),
)

#: The built-in synthetic workloads by name.
SYNTHETIC_SPECS: Final[dict[str, SyntheticSpec]] = {
    s.name: s for s in (FIVE_TASK_MIX, CONVERSATION, PREFIX_SHARING, SMALL_MIX)
}


def load_workload(spec: str, *, n: int | None, rate: float | None, seed: int = 0) -> Workload:
    """The CLI's workload: a synthetic spec name or a trace path.

    * A key of :data:`SYNTHETIC_SPECS` (optionally written ``synthetic:<name>``):
      ``n`` requests (required) from :func:`synthetic` at ``rate`` (default 1.0)
      requests/s.
    * Otherwise a trace file: :func:`load_trace`, then the first ``n`` requests if
      ``n`` is given, then rescaled with :meth:`Workload.with_rate` so its mean rate
      is exactly ``rate`` if ``rate`` is given (a trace without timestamps is
      generated at ``rate`` directly).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise WorkloadError(f"{spec}: n must be a positive number of requests, got {n!r}")
    if rate is not None and not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise WorkloadError(f"{spec}: rate must be a positive number of requests/s, got {rate!r}")
    key = spec.removeprefix("synthetic:")
    if key in SYNTHETIC_SPECS:
        if n is None:
            raise WorkloadError(f"{spec}: a synthetic workload needs n (the number of requests)")
        return synthetic(SYNTHETIC_SPECS[key], n=n, rate=rate if rate is not None else 1.0, seed=seed)
    known = ", ".join(SYNTHETIC_SPECS)
    if spec.startswith("synthetic:"):
        raise WorkloadError(f"{spec}: unknown synthetic workload; known: {known}")
    if not Path(spec).expanduser().exists():
        raise WorkloadError(f"{spec}: no such file (and not a synthetic workload: {known})")
    workload = load_trace(spec, seed=seed, rate_if_untimed=rate if rate is not None else 1.0)
    if n is not None:
        workload = workload.window(limit=n)
    if rate is not None:
        workload = workload.with_rate(rate)
    return workload
