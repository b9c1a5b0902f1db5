"""Where a source's records come from: JSON and JSONL files (read here, so every broken line is
reported with its number), or `datasets` data (a ``save_to_disk`` folder or a parquet file) read with
the datasets library, offline.

Usage::

    store = open_storage(DataSource(path="train.jsonl"))
    len(store)                                   # records in the source
    for index, line, record in store.records([0, 5, 9]): ...   # record: a dict, or ValueError (bad line)

Images stored inside `datasets` rows (an ``Image`` column, or raw bytes) are not decoded here: each
becomes a :class:`DatasetImage` that reads its bytes on demand. An image given only by path stays a
path, relative to the source's ``image_folder`` like every other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_llava.config.schema import DataSource
from lora_llava.errors import UserError

Record = tuple[int, int | None, object]  # (index, line or None, record dict | ValueError)
_BATCH = 256
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors write; skipped


class JsonStorage:
    """A JSON list of records, or JSONL (one record a line; blank lines skipped, line numbers kept)."""

    kind = "json"

    def __init__(self, path: Path, lines: bool) -> None:
        self.path = path
        raw = path.read_bytes()
        raw = raw[3:] if raw.startswith(_BOM) else raw
        if lines:
            if raw.lstrip()[:1] == b"[":
                raise UserError(
                    f"data file {str(path)!r} is a JSON list (it starts with '['), not JSON lines",
                    hint=f"rename it to {path.with_suffix('.json').name}",
                )
            self.kind = "jsonl"
            self._records = list(_jsonl(raw))
        else:
            self._records = [(i, None, rec) for i, rec in enumerate(_json_list(path, raw))]

    def __len__(self) -> int:
        return len(self._records)

    def records(self, indices: Iterable[int]) -> Iterator[Record]:
        for i in indices:
            yield self._records[i]


def _jsonl(raw: bytes) -> Iterator[Record]:
    index = 0
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec: object = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            rec = ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")
        except json.JSONDecodeError as e:
            rec = ValueError(f"broken JSON line ({e.msg}, column {e.colno})")
        yield index, n, rec
        index += 1


def _json_list(path: Path, raw: bytes) -> list:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"data file {str(path)!r} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        one_a_line = raw.lstrip()[:1] == b"{" and e.msg == "Extra data"
        raise UserError(
            f"data file {str(path)!r}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
            hint="it holds one record a line: rename it to .jsonl" if one_a_line else None,
        ) from None
    if not isinstance(data, list):
        raise UserError(
            f"data file {str(path)!r}: expected a JSON list of samples, got {type(data).__name__}",
            hint="JSONL (one sample a line) needs the .jsonl extension",
        )
    return data


# ------------------------------------------------------------------------------------------------ datasets


class _ImageColumn:
    """One image column of a `datasets.Dataset`, read row by row as Arrow (nothing decoded)."""

    def __init__(self, dataset: Any, column: str, label: str) -> None:
        self.rows = dataset.select_columns([column]).with_format("arrow")
        self.column = column
        self.label = label

    def cell(self, row: int) -> Any:
        return self.rows[row].column(0)[0].as_py()


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


class DatasetsStorage:
    """A `datasets` save_to_disk folder (Dataset or DatasetDict) or a parquet file."""

    kind = "datasets"

    def __init__(self, src: DataSource, path: Path) -> None:
        import datasets

        was_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            ds = _open_dataset(src, path)
        finally:
            if not was_disabled:
                datasets.enable_progress_bars()
        self.path = path
        self.dataset = ds
        self.arrow = ds.with_format("arrow")
        label = str(path)
        self.images = {c: _ImageColumn(ds, c, label) for c, f in ds.features.items() if _is_image_feature(f)}

    def __len__(self) -> int:
        return len(self.dataset)

    def records(self, indices: Iterable[int]) -> Iterator[Record]:
        indices = list(indices)
        for start in range(0, len(indices), _BATCH):
            chunk = indices[start : start + _BATCH]
            rows = self.arrow[chunk].to_pylist()
            for row, rec in zip(chunk, rows):
                for col, store in self.images.items():
                    value = rec.get(col)
                    if isinstance(value, list):
                        rec[col] = [_image_ref(v, store, row, k) for k, v in enumerate(value)]
                    elif value is not None:
                        rec[col] = _image_ref(value, store, row, None)
                yield row, None, rec


def _open_dataset(src: DataSource, path: Path) -> Any:
    from datasets import Dataset, DatasetDict, load_from_disk

    if path.is_dir():
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
    if src.split is not None:
        raise UserError(f"data file {str(path)!r}: data.*.split applies to a saved DatasetDict folder only")
    try:
        return Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"data file {str(path)!r} is not a readable parquet file ({type(e).__name__}: {e})") from None


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
