"""Third parties speak through lora_llava: their warnings and log lines go to a log file, not to the terminal.

Usage::

    settle("train")                 # first thing in a command, before any third-party package is imported
    log_into(run.third_party_log)   # from here on (and what came before) into the run's own folder

A command prints lora_llava's lines. Warnings and log records of transformers, bitsandbytes, kernels,
datasets, huggingface_hub, PIL, wandb, gradio, torch, ... (Python ``warnings`` and ``logging`` at WARNING
and above) are written to a log file: the run's ``third_party.log`` once a run directory is known, else
``<lora_llava cache>/logs/<verb>.log`` (the last command of each verb). The few that change what a run
does become one ``warning:`` line on stderr that says so (``TRANSLATIONS``). ``LORA_LLAVA_THIRD_PARTY=show``
also shows every such line on stderr, as the package wrote it.

No command reaches the network unless it needs the Hub: ``settle`` keeps the ``kernels`` package from
being imported, so neither transformers (``USE_HUB_KERNELS=NO``: a model computes with its own layers)
nor bitsandbytes (a 4-bit kernel for CPUs with AVX512-BF16; it uses its own CPU code instead) looks up,
downloads and runs compiled kernels from the Hub, and it turns off Hugging Face and Gradio telemetry. This changes process-wide settings and is done by the command, never by the
library (``import lora_llava`` changes nothing).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

# (logger name prefix, pattern, what it means for the run): third-party lines a user must see, in our words
TRANSLATIONS: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes",
        r"library load error|No prebuilt binary|compiled without GPU support",
        "bitsandbytes could not load its native library for this GPU: 4-bit layers run a slow fallback or fail "
        "(install the bitsandbytes build for your CUDA version; `lora-llava env` shows the backend; details in {log})",
    ),
    (
        "torch",
        r"autograd kernel was not registered",
        "a layer runs without a backward pass: its gradients are missing (details in {log})",
    ),
)

# environment settings that keep third parties off the network when nothing asked them to go there
QUIET_ENV = {
    "USE_HUB_KERNELS": "NO",  # transformers >= 5.25 would swap layers for Hub kernels at every from_pretrained
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# packages that configure a logger of their own to stderr when imported: (module, how to make it propagate)
_LIBRARY_LOGGING = {
    "transformers.utils.logging": ("disable_default_handler", "enable_propagation", "disable_progress_bar"),
    "huggingface_hub.utils.logging": ("enable_propagation",),
    "datasets.utils.logging": ("enable_propagation",),
}
MAX_KEPT = 2000  # lines kept in memory to replay into the run's log file


class _Sink(logging.Handler):
    """The root handler: every third-party line into the log file (opened on the first line), translations
    to stderr once each."""

    def __init__(self, default: Path, show: bool) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.default = default
        self.path: Path | None = None
        self.stream: TextIO | None = None
        self.kept: deque[str] = deque(maxlen=MAX_KEPT)
        self.show = show
        self.said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a third party's malformed record is not worth failing a run
            return
        self.kept.append(line)
        self._write(line)
        if self.show:
            print(line, file=sys.stderr)
        for prefix, pattern, meaning in TRANSLATIONS:
            if record.name.startswith(prefix) and meaning not in self.said and re.search(pattern, line):
                self.said.add(meaning)
                print(f"warning: {meaning.format(log=self.path or self.default)}", file=sys.stderr)

    def _write(self, line: str) -> None:
        if self.stream is None:
            self.retarget(self.path or self.default)
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def retarget(self, path: Path, replay: bool = False) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "a" if replay else "w", encoding="utf-8")  # noqa: SIM115 - kept open
        except OSError:  # no writable place: the lines stay in memory only
            return
        self.stream.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} lora-llava {' '.join(sys.argv[1:])}\n")
        for line in self.kept if replay else ():
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


_SINK: _Sink | None = None


def settle(verb: str, cache: Path | None = None) -> None:
    """Route third-party warnings and log lines of this process to a log file, keep ``kernels`` from reaching the
    Hub, turn telemetry off. Idempotent; ``cache``: the folder of the default log (lora_llava's cache)."""
    global _SINK
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # several processes: torch's C++ warnings (DDP's reducer about find_unused_parameters, which lora_llava
        # sets on purpose) would print once per process to stderr, past any Python sink; read when torch loads
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.modules.setdefault("kernels", None)  # type: ignore[arg-type]  # an import of it fails: no Hub kernels
    if _SINK is None:
        if cache is None:
            from lora_llava.fsutil import cache_root

            cache = cache_root()
        _SINK = _Sink(cache / "logs" / f"{verb}.log", show=os.environ.get("LORA_LLAVA_THIRD_PARTY") == "show")
        root = logging.getLogger()
        root.addHandler(_SINK)
        if root.level > logging.WARNING or root.level == logging.NOTSET:
            root.setLevel(logging.WARNING)
        logging.captureWarnings(True)
        warnings.simplefilter("default")  # each warning once per place, into the log
        _after_import(list(_LIBRARY_LOGGING), _propagate)
    for module in list(_LIBRARY_LOGGING):
        if module in sys.modules:  # imported before settle (a library caller): route it now
            _propagate(sys.modules[module])


def log_into(path: Path) -> None:
    """From now on write third-party lines to ``path`` (a run's ``third_party.log``), with the lines so far."""
    if _SINK is not None:
        _SINK.retarget(path, replay=True)


def settled() -> bool:
    """Whether ``settle`` runs this process (a ``lora-llava`` command)."""
    return _SINK is not None


def _propagate(module: ModuleType) -> None:
    """A library's own stderr handler removed, its records passed up to the root (our sink)."""
    for name in _LIBRARY_LOGGING.get(module.__name__, ()):
        getattr(module, name, lambda: None)()
    logger = logging.getLogger(module.__name__.split(".")[0])  # the package's root logger
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    logger.propagate = True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs each ``action(module)`` registered for a name right after that module is imported (the import
    itself is left to the other finders)."""

    def __init__(self) -> None:
        self.actions: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.actions:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run, actions = loader.exec_module, self.actions[fullname]

        def exec_module(module: ModuleType) -> None:
            run(module)
            for action in actions:
                action(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def when_imported(name: str, action: Callable[[ModuleType], None]) -> None:
    """``action(module)`` once ``name`` is imported: now when it already is, else right after its import (a
    setting made without paying for the import in a process that never needs the module)."""
    if name in sys.modules:
        action(sys.modules[name])
        return
    _after_import([name], action)


def _after_import(names: Sequence[str], action: Callable[[ModuleType], None]) -> None:
    finder = next((f for f in sys.meta_path if isinstance(f, _AfterImport)), None)
    if finder is None:
        finder = _AfterImport()
        sys.meta_path.insert(0, finder)
    for name in names:
        if action not in finder.actions.setdefault(name, []):
            finder.actions[name].append(action)
