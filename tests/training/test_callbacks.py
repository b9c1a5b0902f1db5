"""What a run reports while it trains."""

from __future__ import annotations


def test_trained_run_logs_low_padding(trained_run):
    import json

    rows = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["padding_fraction"] < 0.05  # grouped (the default); random batches pad ~20% of shapes
