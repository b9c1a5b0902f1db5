"""``data generate`` writes only what is its own: a file at the journal's name that is not a journal, an output
that is an input or that data generate did not write, a report of the user's are refused untouched; two runs
never share a journal at once; an earlier output is replaced only by a re-run of its job or with --overwrite.
Also: an LLM's words to its requester never reach the output, they are rejected and reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import assert_user_error, run_cli

from lora_llava.datagen.config import load_datagen_config
from lora_llava.datagen.journal import is_llava_output, write_llava_json
from lora_llava.datagen.run import generate_data
from lora_llava.errors import UserError


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def quiet(config: dict, **kw):
    return generate_data(load_datagen_config(config), progress=False, log=lambda s: None, **kw)


@pytest.mark.parametrize(
    "foreign",
    [
        b"groceries\nrye bread\noat milk",  # notes, the last line without a newline (the old reader cut it off)
        b'{"experiment": "ablation-7", "lr": 0.0003}',  # one JSON object, no newline at all (was emptied)
        b'{"image_id": "0", "kind": "detail", "status": "kept"}\nplain words\n{"image_id"',
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    ],
)
def test_a_file_at_the_journals_name_that_is_no_journal_is_refused_untouched(openai_config, server, tmp_path, foreign):
    journal = tmp_path / "out" / "gen.journal.jsonl"
    journal.parent.mkdir()
    journal.write_bytes(foreign)
    with pytest.raises(UserError) as e:
        quiet(openai_config())
    assert "is not a journal of lora-llava data generate" in str(e.value) and "left as it is" in str(e.value)
    assert journal.read_bytes() == foreign and not server.requests
    assert not (tmp_path / "out" / "gen.json").exists()


def test_a_journal_of_an_earlier_version_without_a_header_is_resumed(openai_config, server, tmp_path):
    quiet(openai_config(), limit=2)
    journal = tmp_path / "out" / "gen.journal.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[1:-1]) + "\n" + lines[-1][:30])  # no header; its last line cut by a kill
    server.requests.clear()
    result = quiet(openai_config(), limit=3)
    assert result.resumed == 5 and len(server.requests) == 4 and result.samples == 9
    assert not journal.read_text().startswith('{"lora_llava_datagen_journal"')  # not rewritten, only appended to


def test_an_input_is_never_the_output_even_with_overwrite(openai_config, server, coco, tmp_path, capsys):
    before = coco.read_bytes()
    cfg = write(tmp_path / "gen.yaml", openai_config())
    for extra in ([], ["--overwrite"]):
        res = run_cli(capsys, "data", "generate", cfg, "--output", coco, "--no-progress", *extra)
        assert_user_error(*res, f"--output {str(coco)!r} is annotations.path, an input of this run", "another --output")
    assert coco.read_bytes() == before and not server.requests
    shots = tmp_path / "shots.json"  # an image folder with a .json name
    shutil.copytree(coco.parent / "images", shots)
    raw = openai_config()
    raw["annotations"]["image_folder"] = str(shots)
    res = run_cli(capsys, "data", "generate", write(tmp_path / "g2.yaml", raw), "--output", shots, "--overwrite")
    assert_user_error(*res, "is annotations.image_folder, an input of this run")
    assert sorted(p.name for p in shots.iterdir()) == sorted(p.name for p in (coco.parent / "images").iterdir())


def test_an_existing_output_is_replaced_only_by_its_own_job_or_with_overwrite(openai_config, server, tmp_path, capsys):
    out = tmp_path / "curated.json"
    mine = json.dumps([{"id": "hand-1", "image": "img0.png", "conversations": []}], indent=2).encode()
    out.write_bytes(mine)  # a user's hand-written LLaVA file at the output's name
    cfg = write(tmp_path / "gen.yaml", openai_config())
    for extra in ([], ["--overwrite"]):
        res = run_cli(capsys, "data", "generate", cfg, "--output", out, "--limit", "1", *extra)
        assert_user_error(*res, f"--output {str(out)!r} exists and is not an output of lora-llava data generate")
    assert out.read_bytes() == mine and not server.requests
    assert not (tmp_path / "curated.journal.jsonl").exists()  # refused before anything was written

    out.unlink()
    assert run_cli(capsys, "data", "generate", cfg, "--output", out, "--limit", "1", "--no-progress")[0] == 0
    code, text, _ = run_cli(capsys, "data", "generate", cfg, "--output", out, "--limit", "2", "--no-progress")
    assert code == 0 and "(6 samples from 2 images)" in text  # a re-run of the job replaces its own output
    (tmp_path / "curated.journal.jsonl").unlink()
    res = run_cli(capsys, "data", "generate", cfg, "--output", out, "--limit", "1", "--no-progress")
    assert_user_error(*res, "an earlier output of lora-llava data generate, but no journal at",
                      "pass --overwrite")  # fmt: skip
    assert len(json.loads(out.read_text())) == 6
    code, text, _ = run_cli(capsys, "data", "generate", cfg, "--output", out, "--limit", "1", "--overwrite")
    assert code == 0 and "(3 samples from 1 images)" in text and len(json.loads(out.read_text())) == 3


def test_a_users_file_at_the_reports_name_is_refused_untouched(openai_config, server, tmp_path):
    report = tmp_path / "out" / "gen.report.txt"
    report.parent.mkdir()
    report.write_text("meeting notes: ship the dataset on friday\n")
    with pytest.raises(UserError, match="is not a report of lora-llava data generate; it is left as it is"):
        quiet(openai_config())
    assert report.read_text() == "meeting notes: ship the dataset on friday\n" and not server.requests


HOLD = "import sys; from pathlib import Path; from lora_llava.layout import hold_lock\n" \
       "hold_lock(Path(sys.argv[1]), 'test'); print('held', flush=True); sys.stdin.read()"  # fmt: skip


def _holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held", proc.stderr
    return proc


def test_two_runs_never_write_one_journal_at_once(openai_config, server, tmp_path):
    lock = tmp_path / "out" / "gen.journal.jsonl.lock"
    lock.parent.mkdir()
    other = _holder(lock)  # another data generate, still running on the same journal
    try:
        with pytest.raises(UserError) as e:
            quiet(openai_config())
        assert f"journal {str(tmp_path / 'out' / 'gen.journal.jsonl')!r} is in use by another lora_llava " \
               f"process (pid {other.pid})" in str(e.value)  # fmt: skip
        assert not server.requests and not (tmp_path / "out" / "gen.journal.jsonl").exists()
    finally:
        other.communicate("")
    assert quiet(openai_config(), limit=1).samples == 3
    after = _holder(lock)  # the finished run let go of it
    after.communicate("")
    assert after.returncode == 0


def test_a_lock_files_name_taken_by_a_users_file_is_refused_untouched(openai_config, server, tmp_path):
    lock = tmp_path / "out" / "gen.journal.jsonl.lock"
    lock.parent.mkdir()
    lock.write_text("todo: label the new batch\n")
    with pytest.raises(UserError, match="is not a lock file of lora_llava"):
        quiet(openai_config())
    assert lock.read_text() == "todo: label the new batch\n"


def test_framing_is_rejected_and_reported_never_written(openai_config, server, tmp_path):
    def chatty(body):
        text = server.canned(body)
        last = body["messages"][-1]["content"]
        if server.kind_of(body) == "detail" and "green" in last:
            return f"Sure! Here is a detailed description of the image:\n\n{text}"
        if server.kind_of(body) == "detail" and "blue" in last:
            return f"{text}\n\nLet me know if you would like a shorter version!"
        if server.kind_of(body) == "conversation" and "yellow" in last:
            return f"{text}\nHope this helps!"
        return text

    server.answer = chatty
    result = quiet(openai_config())
    detail = result.report.kinds["detail"]
    assert detail.rejected["framing"] == 3 and detail.kept == 3  # green: 2 images, blue: 1 (of 6)
    assert result.report.kinds["conversation"].rejected["framing"] == 1
    assert "framing 3" in result.report_text and "a preamble before the description: 'Sure!" in result.report_text
    written = (tmp_path / "out" / "gen.json").read_text()
    assert all(s not in written for s in ("Sure!", "Let me know", "Hope this helps"))


def test_only_what_write_llava_json_writes_counts_as_an_earlier_output(tmp_path):
    empty, one, other = tmp_path / "none.json", tmp_path / "one.json", tmp_path / "other.json"
    write_llava_json(empty, [])  # every generation rejected: still data generate's output
    sample = {"id": "7-detail", "image": "a.png", "conversations": [],
              "provenance": {"kind": "detail", "generator": "g", "prompt_version": "2", "annotation_id": "7"}}  # fmt: skip
    write_llava_json(one, [sample])
    other.write_text(json.dumps([sample]))  # the same sample, written by someone else on one line
    assert is_llava_output(empty) and is_llava_output(one) and not is_llava_output(other)
    assert not is_llava_output(tmp_path / "missing.json")
