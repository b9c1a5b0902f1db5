"""Where a source's records come from: JSON and JSONL files (read here, so every broken line is
reported with its number), or `datasets` data (a ``save_to_disk`` folder or a parquet file) read with
pyarrow (parquet) or the datasets library (folders), offline, nothing copied into a cache.

Usage::

    store = open_storage(DataSource(path="train.jsonl"))
    len(store)                                   # records in the source
    for index, line, record in store.records([0, 5, 9]): ...   # record: a dict, or ValueError (bad line)

Every input is read within bounds: a JSONL file is indexed line by line (a line over
``MAX_LINE_BYTES`` is a bad sample, skipped in chunks, never loaded) and each line parsed when its
record is asked for; JSON nested past Python's recursion limit, or an integer past its digit limit, is
a bad record, not a traceback; parquet and `datasets` data are read for the columns a source maps
only (``source_columns``), so an unused column (a big blob) is never loaded.

Images stored inside `datasets` rows (an ``Image`` column, or raw bytes) are not decoded here: each
becomes a :class:`DatasetImage` that reads its bytes on demand. An image given only by path stays a
path, relative to the source's ``image_folder`` like every other.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lora_llava.config.schema import DataSource
from lora_llava.errors import UserError

Record = tuple[int, int | None, object]  # (index, line or None, record dict | ValueError)
_BATCH = 256
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write; skipped
# The longest JSONL line read (bytes). A record is one conversation: even a long multi-turn one with
# inline base64 images is a few MB; a longer line is a bad sample, skipped without being loaded.
MAX_LINE_BYTES = 16 * 1024 * 1024
_SKIP_CHUNK = 1024 * 1024  # bytes read at a time while skipping an over-long line
_EOL = re.compile(rb"\r\n?|\n")  # line ends as bytes.splitlines knows them (a lone \r too)


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def unreadable_json(e: Exception) -> str:
    """Why ``json`` could not read valid JSON text, to follow what it is ("JSON line", "record"):
    nesting past Python's recursion limit, or an integer past its digit limit."""
    if isinstance(e, RecursionError):
        return "is nested too deeply to read (lists or objects inside one another past Python's recursion limit)"
    m = re.search(r"limit \((\d+) digits\).*value has (\d+) digits", str(e))
    if m:
        return f"holds an integer of {m[2]} digits; Python reads integers of at most {m[1]} digits"
    return f"cannot be read ({type(e).__name__}: {e})"


def _parse_line(line: bytes) -> object:
    """A JSONL line -> its record, or ValueError naming what is wrong with it."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return ValueError(f"broken JSON line ({e.msg}, column {e.colno})")
    except (RecursionError, ValueError) as e:  # deep nesting; an integer past the digit limit
        return ValueError(f"JSON line {unreadable_json(e)}")


class JsonStorage:
    """A JSON list of records, or JSONL (one record a line; blank lines skipped, line numbers kept).

    JSONL is indexed (offset, size, line number of each record) and each line is read and parsed when
    its record is asked for, so memory holds one line at a time; a line over ``MAX_LINE_BYTES`` is
    never loaded. A JSON list is parsed whole (JSON has no record boundaries to index).
    """

    kind = "json"

    def __init__(self, path: Path, lines: bool) -> None:
        self.path = path
        if lines:
            self.kind = "jsonl"
            self._offsets, self._sizes, self._lines = array("q"), array("q"), array("q")
            with open(path, "rb") as f:
                first = self._index(f)
            if first == b"[":
                raise UserError(
                    f"data file {str(path)!r} is a JSON list (it starts with '['), not JSON lines",
                    hint=f"rename it to {path.with_suffix('.json').name}",
                )
            self._records: list[Record] = []
        else:
            raw = path.read_bytes()
            raw = raw[3:] if raw.startswith(_BOM) else raw
            self._records = [(i, None, rec) for i, rec in enumerate(_json_list(path, raw))]

    def _index(self, f: IO[bytes]) -> bytes:
        """Index every non-blank line of ``f``; returns the first non-blank byte of the file (b"" if none)."""
        first = b""
        offset = 3 if f.read(3) == _BOM else 0
        f.seek(offset)
        n = 0  # line number of the last line read
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return first
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):  # over the limit: skip it in chunks
                size, rest = _skip_line(f)
                n += 1
                first = first or line.lstrip()[:1]
                self._add(offset, len(line) + size if size else len(line.rstrip(b"\r")), n)
                offset += len(line) + rest
                continue
            start = 0  # one readline; more than one line when it holds lone \r line ends
            for m in _EOL.finditer(line):
                n += 1
                first = self._add_if_text(line, start, m.start(), offset, n, first)
                start = m.end()
            if start < len(line):  # the last line, without a line end
                n += 1
                first = self._add_if_text(line, start, len(line), offset, n, first)
            offset += len(line)

    def _add_if_text(self, line: bytes, start: int, end: int, offset: int, n: int, first: bytes) -> bytes:
        text = line[start:end].strip()
        if text:
            self._add(offset + start, end - start, n)
        return first or text[:1]

    def _add(self, offset: int, size: int, line: int) -> None:
        self._offsets.append(offset)
        self._sizes.append(size)
        self._lines.append(line)

    def __len__(self) -> int:
        return len(self._offsets) if self.kind == "jsonl" else len(self._records)

    def records(self, indices: Iterable[int]) -> Iterator[Record]:
        if self.kind != "jsonl":
            for i in indices:
                yield self._records[i]
            return
        with open(self.path, "rb") as f:
            for i in indices:
                size, n = self._sizes[i], self._lines[i]
                if size > MAX_LINE_BYTES:
                    yield i, n, ValueError(_too_long(size))
                    continue
                f.seek(self._offsets[i])
                yield i, n, _parse_line(f.read(size))


def _too_long(size: int) -> str:
    return f"line of {_mib(size)} ({size} bytes), over the {_mib(MAX_LINE_BYTES)} limit of one JSONL record; not read"


def _skip_line(f: IO[bytes]) -> tuple[int, int]:
    """Read past the rest of the current line, a chunk at a time: (its bytes without the line end, bytes read)."""
    read = 0
    while True:
        chunk = f.readline(_SKIP_CHUNK)
        read += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return read - (len(chunk) - len(chunk.rstrip(b"\r\n"))), read


_WS = re.compile(r"[ \t\n\r]+")
_CONTAINER_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)  # a whole string, or a bracket
_SCALAR_END = re.compile(r"[,\]\s]")


def _json_list(path: Path, raw: bytes) -> list:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {str(path)!r} is not UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid_json(path, raw, e) from None
    except (RecursionError, ValueError) as e:  # valid JSON that json cannot hold: find the records that are
        if text.lstrip()[:1] != "[":
            raise UserError(f"data file {str(path)!r} {unreadable_json(e)}") from None
        data = _json_list_by_record(path, raw, text)
    if not isinstance(data, list):
        raise UserError(
            f"data file {str(path)!r}: expected a JSON list of samples, got {type(data).__name__}",
            hint="JSONL (one sample a line) needs the .jsonl extension",
        )
    return data


def _invalid_json(path: Path, raw: bytes, e: json.JSONDecodeError) -> UserError:
    one_a_line = raw.lstrip()[:1] == b"{" and e.msg == "Extra data"
    return UserError(
        f"data file {str(path)!r}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
        hint="it holds one record a line: rename it to .jsonl" if one_a_line else None,
    )


def _json_list_by_record(path: Path, raw: bytes, text: str) -> list:
    """A JSON list read one record at a time, so that a record ``json`` cannot hold (nested too deeply,
    an integer too long) becomes a ValueError in its place, skipped by its brackets, not a failed file."""
    decoder = json.JSONDecoder()
    out: list = []
    i = _after_ws(text, text.index("[") + 1)
    if text.startswith("]", i):
        return out
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise _invalid_json(path, raw, e) from None
        except (RecursionError, ValueError) as e:
            value, end = ValueError(f"record {unreadable_json(e)}"), _skip_value(path, text, i)
        out.append(value)
        i = _after_ws(text, end)
        if text.startswith(",", i):
            i = _after_ws(text, i + 1)
        elif text.startswith("]", i):
            return out
        else:
            line, col = text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)
            raise UserError(f"data file {str(path)!r}: invalid JSON at line {line}, column {col}: expected ',' or ']'")


def _after_ws(text: str, i: int) -> int:
    m = _WS.match(text, i)
    return m.end() if m else i


def _skip_value(path: Path, text: str, i: int) -> int:
    """The end of the JSON value starting at ``i``, found by counting brackets outside strings (no recursion)."""
    if text[i] not in "[{":  # a scalar (an over-long integer): up to the next separator
        m = _SCALAR_END.search(text, i)
        return m.start() if m else len(text)
    depth = 0
    for m in _CONTAINER_TOKEN.finditer(text, i):
        token = m.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    raise UserError(f"data file {str(path)!r}: invalid JSON: a list or object that starts at character {i} never ends")


# ------------------------------------------------------------------------------------------------ datasets


class _Cells:
    """One column's Arrow cells, shared by every image column object of the same parquet file and column."""

    __slots__ = ("array", "__weakref__")

    def __init__(self, array: Any) -> None:
        self.array = array


_PARQUET_COLUMNS: weakref.WeakValueDictionary[tuple, _Cells] = weakref.WeakValueDictionary()


def _parquet_cells(path: Path, column: str, stamp: tuple[int, int], array: Any = None) -> _Cells:
    """The cells of ``column`` of a parquet file: ``array`` when given (and registered), else one shared read
    of that column per process for as long as someone holds it."""
    key = (str(path), column, stamp)
    cells = _PARQUET_COLUMNS.get(key)
    if cells is None:
        if array is None:
            if _stamp(path) != stamp:
                raise OSError(f"{str(path)!r} changed since its samples were read")
            import pyarrow.parquet as pq

            array = pq.read_table(path, columns=[column]).column(0)
        cells = _PARQUET_COLUMNS[key] = _Cells(array)
    return cells


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@dataclass(frozen=True)
class ParquetColumn:
    path: Path
    stamp: tuple[int, int]  # (mtime_ns, size) of the file when read
    array: Any  # its cells, a pyarrow ChunkedArray


class _ImageColumn:
    """One image column, read row by row as Arrow (nothing decoded): of a `datasets.Dataset` (memory-mapped),
    or of a parquet file (the column, read once; pickled as the file and column name, read again where
    unpickled, once per process)."""

    def __init__(self, column: str, label: str, dataset: Any = None, parquet: ParquetColumn | None = None) -> None:
        self.column = column
        self.label = label
        self.rows: Any = dataset.select_columns([column]).with_format("arrow") if dataset is not None else None
        self.parquet: tuple[Path, tuple[int, int]] | None = None  # (file, stamp) when read from parquet
        self._cells: _Cells | None = None
        if parquet is not None:
            self.parquet = (parquet.path, parquet.stamp)
            self._cells = _parquet_cells(parquet.path, column, parquet.stamp, parquet.array)

    def cell(self, row: int) -> Any:
        if self.parquet is None:
            return self.rows[row].column(0)[0].as_py()
        if self._cells is None:  # unpickled: read the column again (once per process)
            self._cells = _parquet_cells(self.parquet[0], self.column, self.parquet[1])
        return self._cells.array[row].as_py()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cells": None}


@dataclass(frozen=True, eq=False)
class DatasetImage:
    """An image stored in a `datasets` row; ``read_bytes()`` fetches its encoded bytes (memory-mapped)."""

    store: _ImageColumn
    row: int
    item: int | None  # position in a list of images, None for a single image

    @property
    def name(self) -> str:
        where = f"{self.store.column}[{self.item}]" if self.item is not None else self.store.column
        return f"row {self.row} {where}"

    def read_bytes(self) -> bytes:
        cell = self.store.cell(self.row)
        value = cell if self.item is None else cell[self.item]
        return value["bytes"] if isinstance(value, dict) else value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DatasetImage) and (self.store, self.row, self.item) == (
            other.store,
            other.row,
            other.item,
        )

    def __hash__(self) -> int:
        return hash((id(self.store), self.row, self.item))

    def __repr__(self) -> str:
        return f"DatasetImage({self.store.label}, {self.name})"


def _is_image_feature(feature: Any) -> bool:
    from datasets import Image, List, Sequence, Value

    if isinstance(feature, (List, Sequence)):
        feature = feature.feature
    if isinstance(feature, dict):  # {bytes, path} structs: how pandas writes images, and datasets' own layout
        if set(feature) == {"bytes", "path"}:  # also when every row gives a path only (bytes typed null)
            return True
        feature = feature.get("bytes")
    return isinstance(feature, Image) or (isinstance(feature, Value) and feature.dtype in ("binary", "large_binary"))


def _image_ref(value: Any, store: _ImageColumn, row: int, item: int | None) -> Any:
    """Embedded bytes -> DatasetImage; a path-only Image -> the path string; anything else (a cell with
    neither bytes nor a path among them) as is, for the record's reader to name."""
    if isinstance(value, (bytes, bytearray)):
        return DatasetImage(store, row, item)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return DatasetImage(store, row, item)
        if value.get("path") is not None:
            return value["path"]
    return value


def source_columns(src: DataSource, names: Iterable[str]) -> list[str]:
    """The columns of ``names`` a source's records are read from: its id, its turns (``conversations`` or
    ``messages``) and its images (``image`` or ``images``), as ``columns`` maps them; with ``format:
    auto`` both default names of each, which is what telling the format apart looks at. No other
    column is read: a record's other fields (a big blob beside the images) are never loaded."""
    c = src.columns
    conversations = [c.conversations] if c.conversations else ["conversations", "messages"]
    images = [c.image] if c.image else ["image", "images"]
    if src.format != "auto" and not c.conversations:
        conversations = ["messages" if src.format == "messages" else "conversations"]
    if src.format in ("llava", "messages") and not c.image:
        images = ["images" if src.format == "messages" else "image"]
    wanted = {c.id or "id", *conversations, *images}
    return [n for n in names if n in wanted]


class _Row(dict):
    """A record read from some columns only; ``field_names`` are all the columns of the source (named
    when the record lacks its turns)."""

    field_names: tuple[str, ...] = ()


class DatasetsStorage:
    """A `datasets` save_to_disk folder (Dataset or DatasetDict) or a parquet file, read for the columns
    :func:`source_columns` names only, nothing copied into the `datasets` cache: a folder is memory-mapped
    by `datasets`, a parquet file read with pyarrow (only those column chunks are read from disk)."""

    kind = "datasets"

    def __init__(self, src: DataSource, path: Path) -> None:
        self.path = path
        label = str(path)
        if path.is_dir():
            import datasets

            was_disabled = datasets.are_progress_bars_disabled()
            datasets.disable_progress_bars()
            try:
                ds = _open_dataset(src, path)
            finally:
                if not was_disabled:
                    datasets.enable_progress_bars()
            self.field_names = tuple(ds.column_names)
            self.columns = source_columns(src, ds.column_names)
            self.length = len(ds)  # before selecting: a Dataset of no columns has no rows
            ds = ds.select_columns(self.columns)
            self.table = ds.with_format("arrow")
            self._pyarrow = False
            features = ds.features
            self.images = {c: _ImageColumn(c, label, dataset=ds) for c, f in features.items() if _is_image_feature(f)}
        else:
            if src.split is not None:
                raise UserError(f"data file {str(path)!r}: data.*.split applies to a saved DatasetDict folder only")
            stamp = _stamp(path)
            self.table, self.field_names = _read_parquet(src, path)
            self._pyarrow = True
            self.columns = self.table.column_names
            self.length = self.table.num_rows
            from datasets import Features

            features = Features.from_arrow_schema(self.table.schema) if self.columns else {}
            self.images = {
                c: _ImageColumn(c, label, parquet=ParquetColumn(path, stamp, self.table.column(c)))
                for c, f in features.items()
                if _is_image_feature(f)
            }

    def __len__(self) -> int:
        return self.length

    def _rows(self, chunk: list[int]) -> list:
        if not self.columns:
            return [{} for _ in chunk]
        rows = self.table.take(chunk) if self._pyarrow else self.table[chunk]
        return rows.to_pylist()

    def records(self, indices: Iterable[int]) -> Iterator[Record]:
        indices = list(indices)
        for start in range(0, len(indices), _BATCH):
            chunk = indices[start : start + _BATCH]
            for row, values in zip(chunk, self._rows(chunk)):
                rec = _Row(values)
                rec.field_names = self.field_names
                for col, store in self.images.items():
                    value = rec.get(col)
                    if isinstance(value, list):
                        rec[col] = [_image_ref(v, store, row, k) for k, v in enumerate(value)]
                    elif value is not None:
                        rec[col] = _image_ref(value, store, row, None)
                yield row, None, rec


def _read_parquet(src: DataSource, path: Path) -> tuple[Any, tuple[str, ...]]:
    """(the columns ``src`` maps of a parquet file as a pyarrow Table, the names of all its columns)."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path, memory_map=True)
        names = tuple(f.schema_arrow.names)
        return f.read(columns=source_columns(src, names)), names
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"data file {str(path)!r} is not a readable parquet file ({type(e).__name__}: {e})") from None


def _open_dataset(src: DataSource, path: Path) -> Any:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"data folder {str(path)!r} is not a datasets save_to_disk folder",
            hint="give a JSON/JSONL/parquet file, or a folder written by Dataset.save_to_disk",
        ) from None
    if isinstance(ds, DatasetDict):
        names = list(ds)
        name = src.split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if name not in ds:
            raise UserError(
                f"data folder {str(path)!r} holds splits {', '.join(names)}"
                + (f", not {src.split!r}" if src.split else ""),
                hint="choose one with data.*.split",
            )
        return ds[name]
    if src.split is not None:
        raise UserError(f"data folder {str(path)!r} holds one Dataset; data.*.split applies to a DatasetDict")
    return ds


def open_storage(src: DataSource) -> JsonStorage | DatasetsStorage:
    """The storage of ``src.path`` by its kind: folder or .parquet -> datasets, .json/.jsonl -> JSON."""
    path = Path(src.path)
    if not path.exists():
        raise UserError(
            f"data file {str(path)!r} not found",
            hint="check data.*.path (relative paths start at the current directory)",
        )
    if path.is_dir() or path.suffix == ".parquet":
        return DatasetsStorage(src, path)
    if path.suffix in (".json", ".jsonl"):
        return JsonStorage(path, lines=path.suffix == ".jsonl")
    with open(path, "rb") as f:  # another extension: tell a JSON list from JSONL by the first character
        head = f.read(4096).lstrip()
    if head[:1] in (b"[", b"{"):
        return JsonStorage(path, lines=head[:1] == b"{")
    raise UserError(
        f"data file {str(path)!r}: cannot tell its kind from the extension {path.suffix!r} or its first bytes",
        hint="give a .json (a list of samples), .jsonl (one a line), .parquet file, or a datasets save_to_disk folder",
    )
