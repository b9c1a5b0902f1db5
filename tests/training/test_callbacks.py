"""What a run reports while it trains."""

from __future__ import annotations


def test_trained_run_logs_low_padding(trained_run):
    import json

    rows = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["padding_fraction"] < 0.05  # grouped (the default); random batches pad ~20% of shapes


def test_progress_lines_show_loss_rate_throughput_and_eta(monkeypatch):
    from types import SimpleNamespace

    import lora_llava.training.callbacks as cb

    clock = iter(
        [0.0, 100.0, 130.0]
    )  # made, began, logged  # training began at t=100 at step 40 (a resumed run); 30 s later, step 50
    monkeypatch.setattr(cb, "_now", lambda: next(clock))
    lines: list[str] = []
    bar = cb.ProgressBar(lines.append)
    state = SimpleNamespace(global_step=40, max_steps=100)
    bar.on_train_begin(None, state, None)
    state.global_step = 50
    logs = {"loss": 1.23456, "learning_rate": 2e-4, "tokens_per_s": 12345.0, "supervised_tokens_per_s": 321.0}
    bar.on_log(None, state, None, logs={**logs, "grad_norm": 0.5})
    bar.on_log(None, state, None, logs={"eval_loss": 1.0})  # not a training row: no line
    bar.on_train_end(None, state, None)
    # 10 steps in 30 s, 50 to go: 2m30s
    assert lines == ["step 50/100  loss 1.2346  lr 2.00e-04  tok/s 12.3k  sup/s 321  grad 0.5  eta 2m30s"]


def test_progress_line_shows_the_gpu_peak_when_the_row_has_it(monkeypatch):
    from types import SimpleNamespace

    import lora_llava.training.callbacks as cb

    clock = iter([0.0, 0.0, 10.0])
    monkeypatch.setattr(cb, "_now", lambda: next(clock))
    lines: list[str] = []
    bar = cb.ProgressBar(lines.append)
    state = SimpleNamespace(global_step=0, max_steps=20)
    bar.on_train_begin(None, state, None)
    state.global_step = 10
    row = {"loss": 2.0, "learning_rate": 1e-4, "tokens_per_s": 900.0, "supervised_tokens_per_s": 9.0}
    bar.on_log(None, state, None, logs={**row, "gpu_memory_gib": 10.61})
    bar.on_train_end(None, state, None)
    assert lines == ["step 10/20  loss 2.0000  lr 1.00e-04  tok/s 900  sup/s 9  mem 10.6G  eta 0m10s"]
