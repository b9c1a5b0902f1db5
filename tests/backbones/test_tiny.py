"""The built-in offline backbones build byte-identically."""

from __future__ import annotations


def test_build_tiny_is_byte_identical(tmp_path):
    from lora_llava.backbones.tiny import build_tiny

    a = build_tiny(tmp_path / "a")
    b = build_tiny(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
