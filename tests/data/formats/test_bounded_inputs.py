"""Inputs built to exhaust a reader: a 50 MB JSONL line, JSON nested 100,000 deep, a 5,000-digit integer, a
parquet file whose unused column dwarfs the rest. Each becomes one bad-sample line (or, when a whole file
cannot be read, one error naming why), read within bounded memory, with nothing left in a cache."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from lora_llava.config.schema import Columns, DataSource
from lora_llava.data.formats import open_source, read_source
from lora_llava.data.formats.storage import MAX_LINE_BYTES
from lora_llava.data.images import load_image
from lora_llava.errors import UserError

TURNS = [{"from": "human", "value": "Which planet is closest to the sun?"}, {"from": "gpt", "value": "Mercury."}]
DIGIT_LIMIT = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
DEEP = "is nested too deeply to read (lists or objects inside one another past Python's recursion limit)"


def rec(sid: str, **extra) -> str:
    return json.dumps({"id": sid, "conversations": TURNS, **extra})


def test_a_jsonl_line_over_the_size_limit_is_a_bad_sample_never_loaded(tmp_path):
    assert MAX_LINE_BYTES == 16 * 1024 * 1024
    huge = '{"id": "huge", "conversations": [{"from": "human", "value": "' + "ab" * 26_000_000 + '"}]}'
    size = len(huge)
    path = tmp_path / "big.jsonl"
    with open(path, "w", newline="") as f:  # \r\n line ends and a blank line: line numbers still count
        f.write(rec("p1") + "\r\n\r\n" + huge + "\r\n" + rec("p2") + "\r\n" + "x" * (MAX_LINE_BYTES + 1) + "\n")
        f.write(rec("p3"))  # the last line has no line end
    del huge
    tracemalloc.start()
    try:
        reader = open_source(DataSource(path=str(path)))
        read = reader.read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024  # the 52 MB line was never held whole (a 16 MiB read at most)
    assert [(s.id, s.line) for s in read.samples] == [("p1", 1), ("p2", 4), ("p3", 6)]
    assert [(b.line, b.index, b.id) for b in read.bad] == [(3, 1, None), (5, 3, None)]
    assert read.bad[0].reason == (
        f"line of 49.6 MiB ({size} bytes), over the 16.0 MiB limit of one JSONL record; not read"
    )
    assert read.bad[0].describe() == f"{path} line 3: {read.bad[0].reason}"
    assert read.bad[1].reason.startswith(f"line of 16.0 MiB ({MAX_LINE_BYTES + 1} bytes), over the 16.0 MiB limit")


def test_deep_nesting_and_huge_integers_in_jsonl_are_bad_lines(tmp_path):
    lines = [
        rec("ok-1"),
        '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"id": ' + "7" * 5_000 + ', "conversations": []}',
        "[" * 100_000,  # deep and never closed
        rec("ok-2", score=int("9" * 300)),  # long, but within the digit limit
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    good, bad = read_source(DataSource(path=str(path)))
    assert [(s.id, s.line) for s in good] == [("ok-1", 1), ("ok-2", 5)]
    assert [(b.line, b.reason) for b in bad] == [
        (2, f"JSON line {DEEP}"),
        (3, f"JSON line holds an integer of 5000 digits; Python reads integers of at most {DIGIT_LIMIT} digits"),
        (4, f"JSON line {DEEP}"),
    ]


def test_a_json_list_marks_the_records_json_cannot_hold_and_keeps_the_rest(tmp_path):
    deep = '{"id": "deep", "conversations": [{"from": "human", "value": "]}"}, ' + "[" * 80_000 + "]" * 80_000 + "]}"
    parts = [rec("a"), deep, "1" * 6_000, '{"id": 2' + "0" * 4_999 + "}", rec("b", note='a "[{" in text')]
    path = tmp_path / "list.json"
    path.write_text("[\n " + ",\n ".join(parts) + "\n]")
    good, bad = read_source(DataSource(path=str(path)))
    assert [(s.id, s.index) for s in good] == [("a", 0), ("b", 4)]
    digits = f"Python reads integers of at most {DIGIT_LIMIT} digits"
    assert [(b.index, b.reason) for b in bad] == [
        (1, f"record {DEEP}"),
        (2, f"record holds an integer of 6000 digits; {digits}"),
        (3, f"record holds an integer of 5000 digits; {digits}"),
    ]
    assert bad[0].describe() == f"{path} sample 1: record {DEEP}"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"samples": ' + "[" * 100_000 + "]" * 100_000 + "}", "is nested too deeply to read"),
        ("[" * 100_000, "invalid JSON: a list or object that starts at character 1 never ends"),
        ("[" + rec("a") + ", " + "[" * 100_000 + "]" * 100_000 + " " + rec("b") + "]", "expected ',' or ']'"),
        ("7" * 5_000, "holds an integer of 5000 digits"),
    ],
    ids=["deep-object", "unclosed", "no-comma", "huge-number"],
)
def test_a_json_file_json_cannot_read_at_all_is_one_error_naming_why(tmp_path, text, message):
    path = tmp_path / "whole.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_source(DataSource(path=str(path)))
    assert str(err.value).startswith(f"data file {str(path)!r}")
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ parquet


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 6), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """The `datasets` cache, pointed at an empty folder for the test."""
    import datasets

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_parquet_reads_only_the_mapped_columns_and_copies_nothing_into_the_cache(tmp_path, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 36  # 36 rows, each with a 1 MiB blob nobody maps: 36 MiB of incompressible bytes on disk
    colors = [(200, 7 * i, 40) for i in range(n)]
    table = pa.table(
        {
            "qid": [f"q{i}" for i in range(n)],
            "dialog": [
                [{"from": "human", "value": f"<image>\nShade {i}?"}, {"from": "gpt", "value": "Red."}] for i in range(n)
            ],
            "scan": [{"bytes": _png(c), "path": None} for c in colors],
            "blob": [os.urandom(1 << 20) for _ in range(n)],
        }
    )
    path = tmp_path / "scans.parquet"
    pq.write_table(table, path, compression="none")
    del table
    assert path.stat().st_size > 36 * (1 << 20)

    before = pa.total_allocated_bytes()
    src = DataSource(path=str(path), columns=Columns(id="qid", conversations="dialog", image="scan"))
    reader = open_source(src)
    read = reader.read()
    assert list(hf_cache.iterdir()) == []  # nothing copied into the datasets cache
    assert pa.total_allocated_bytes() - before < 8 * (1 << 20)  # the blob column was not read
    ((_, _, first),) = reader.storage.records([0])
    assert sorted(first) == ["dialog", "qid", "scan"] and reader.storage.columns == ["qid", "dialog", "scan"]
    assert read.bad == [] and [s.id for s in read.samples] == [f"q{i}" for i in range(n)]
    s = read.samples[7]
    assert s.messages[0] == ("user", "<image>\nShade 7?")
    assert load_image(s.images[0]).getpixel((0, 0)) == colors[7]

    copy = pickle.loads(pickle.dumps(s))  # a reference to the file and column travels, not the column
    assert len(pickle.dumps(s)) < 5_000
    assert load_image(copy.images[0]).getpixel((0, 0)) == colors[7]

    # records missing their turns still name every column of the file, read or not
    (bad,) = read_source(DataSource(path=str(path), columns=Columns(id="qid", image="scan")), limit=1)[1]
    assert bad.reason == (
        "missing field 'conversations' (the record has 'qid', 'dialog', 'scan', 'blob'; name the turns field with "
        "data.*.columns: {conversations: <field>})"
    )


def test_a_datasets_folder_reads_only_the_mapped_columns(tmp_path, hf_cache):
    from datasets import Dataset

    rows = {
        "id": ["m0", "m1"],
        "messages": [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]] * 2,
        "embedding": [[0.5] * 4096, [0.25] * 4096],
    }
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "chat_ds"))
    reader = open_source(DataSource(path=str(tmp_path / "chat_ds")))
    ((_, _, first),) = reader.storage.records([1])
    assert sorted(first) == ["id", "messages"] and reader.format == "messages"
    read = reader.read()
    assert [s.id for s in read.samples] == ["m0", "m1"] and read.bad == []
    assert list(hf_cache.iterdir()) == []


def test_a_huge_value_quoted_in_a_reason_or_a_huge_id_keeps_the_report_one_short_line(tmp_path):
    speaker = "narrator " * 250_000  # 2.25 MB, quoted by the unknown-speaker reason
    records = [
        {"id": "loud", "conversations": [{"from": speaker, "value": "Q?"}, {"from": "gpt", "value": "A"}]},
        {"id": "k" * 3_000, "conversations": []},
    ]
    path = tmp_path / "wide.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, (loud, long_id) = read_source(DataSource(path=str(path)))
    assert loud.reason.startswith("turn 0: unknown speaker 'narrator narrator ")
    assert loud.reason.endswith(" characters)") and "na... (2250" in loud.reason and len(loud.reason) <= 1_000
    assert long_id.id == "k" * 3_000  # the id itself is kept whole (rejected.jsonl) ...
    assert long_id.describe() == (  # ... and shown by its start
        f"{path} line 2 (id {'k' * 80}... (3000 characters)): 'conversations' is empty or not a list"
    )
