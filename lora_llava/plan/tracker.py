"""The live-tensor tracker: every storage the ops run inside it allocate, followed until PyTorch frees it,
and the peak of their sum (with what of it was logits, and which storages made it up).

Usage::

    tracker = LiveTensors(vocab_size, held=[*model.parameters(), *model.buffers()])
    with tracker.mode():
        ...  # a forward and backward on the meta device
        tracker.saw([])                    # one last look: what the last ops freed
    tracker.peak, tracker.logits_at_peak   # bytes
    tracker.bytes_at_peak({storage_ref(p.grad)[0], ...})  # of the peak, the bytes of these storages

The storages are keyed by ``lora_llava.compat.storage_ref`` (views share their storage's key) and watched
through ``lora_llava.compat.watch_ops``: both stand on private torch internals, pinned in tests/test_compat.py.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_llava.compat import freed_storages, storage_ref, watch_ops


class LiveTensors:
    """Every storage the ops inside allocate, followed until PyTorch frees it: the peak of their sum."""

    def __init__(self, vocab: int, held: list[torch.Tensor] = ()) -> None:  # type: ignore[assignment]
        self.vocab = vocab
        # storages alive before the step (the model's weights): an op's view of one (a linear layer's
        # transposed weight) is no allocation of the step; their weak references are held, so keys stay unique
        self._held = {key: ref for key, ref in map(storage_ref, held)}
        self.live: dict[int, tuple[Any, int, bool]] = {}  # storage key -> (weak ref, bytes, is logits)
        self.current = self.peak = self.logits_at_peak = 0
        self.keys_at_peak: list[int] = []
        self._refs_at_peak: list[Any] = []  # held: no later storage gets the key of one freed since the peak
        self._snapshot_at = 0

    def mode(self) -> Any:
        """The context inside which every op's outputs are seen."""
        return watch_ops(self.saw)

    def saw(self, tensors: list[torch.Tensor]) -> None:
        for key in freed_storages(self.live):
            _, size, _ = self.live.pop(key)
            self.current -= size
        for t in tensors:
            key, ref = storage_ref(t)
            if key in self.live or key in self._held:
                continue
            size = t.untyped_storage().nbytes()
            self.live[key] = (ref, size, t.dim() >= 2 and t.shape[-1] == self.vocab)
            self.current += size
        if self.current > self.peak:
            self.peak = self.current
            if self.peak > self._snapshot_at * 1.002:  # enough to split the peak by category
                self._snapshot_at = self.peak
                self.keys_at_peak = list(self.live)
                self._refs_at_peak = [ref for ref, _, _ in self.live.values()]
                self.logits_at_peak = sum(s for _, s, lg in self.live.values() if lg)

    def bytes_at_peak(self, keys: set[int]) -> int:
        """Of the peak, the bytes held by storages in ``keys``."""
        found = 0
        for k in self.keys_at_peak:
            if k in keys and k in self.live:
                found += self.live[k][1]
        return found
