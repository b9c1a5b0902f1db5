"""Several processes on one run: which one this is, and the few collective steps lora_llava takes itself.

Usage::

    w = world()                      # World(rank=0, local_rank=0, size=1) without a launcher
    w = start()                      # under torchrun / accelerate launch: the process group, once
    if w.main: write(...)            # only the first process writes files and logs
    run_id = broadcast(run_id)       # the first process's value, on every process
    bad = any_rank(bad)              # True on every process when it is True on one
    barrier()                        # every process got here

``torchrun`` and ``accelerate launch`` start one process per GPU (or, on a machine without one, per
requested process, with the gloo backend) and tell each its place through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). The process group is accelerate's (the one transformers'
Trainer uses too); without a launcher every function here is a no-op on a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all
    local_rank: int = 0  # this process on its machine: its GPU
    size: int = 1  # processes in all

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, as the launcher set it (a world of one without a launcher)."""

    def env(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    size = env("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    return World(env("RANK", 0), env("LOCAL_RANK", 0), size)


def start() -> World:
    """Join the process group of a launched run (nccl on CUDA, gloo on CPUs), once; returns ``world()``."""
    w = world()
    if w.size > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return w


def _ready() -> bool:
    if world().size <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process got here."""
    if _ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """The first process's ``value`` (anything picklable), on every process."""
    if not _ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is True on any process (every process gets the same answer)."""
    if not _ready():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def total(values: list[float]) -> list[float]:
    """The element-wise sum of ``values`` over every process."""
    if not _ready():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(x) for x in t.tolist()]


def _device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")
