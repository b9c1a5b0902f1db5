"""curves.png: drawn at the end of training and by lora-llava plot from metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from helpers import assert_user_error, run_cli

from lora_llava.curves import plot_run
from lora_llava.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def test_training_draws_curves_and_plot_redraws_them(trained_run, tmp_path, capsys):
    assert (trained_run / "curves.png").read_bytes().startswith(PNG)
    code, out, err = run_cli(capsys, "plot", trained_run, "--out", tmp_path / "again.png")
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'again.png'}"
    assert (tmp_path / "again.png").read_bytes().startswith(PNG)


def test_plot_reads_a_run_still_training_and_says_what_is_missing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    code, out, err = run_cli(capsys, "plot", run)
    assert_user_error(code, out, err, "has no metrics.jsonl")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "train_runtime": 1.0}) + "\n")
    with pytest.raises(UserError, match="holds no training loss yet"):
        plot_run(run)
    rows = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3, "tokens_per_s": 100.0} for s in (1, 2, 3)]
    rows.append({"step": 3, "eval_loss": 1.5, "eval_accuracy": 0.25})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    with pytest.raises(UserError, match=r"metrics.jsonl:5: not a JSON line"):  # a torn last line is named
        plot_run(run)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_run(run).read_bytes().startswith(PNG)
    code, out, err = run_cli(capsys, "plot", tmp_path / "missing")
    assert code == 2 and "Traceback" not in err
