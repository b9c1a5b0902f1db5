"""Talking to a trained model: multi-turn, the image placed as the model was trained, answers streamed.

Usage::

    session = ChatSession(load_model("runs/quickstart"), image="photo.jpg")
    answer = session.ask("What color is the shape?", on_text=print)   # streamed pieces, then the answer
    session.ask("And its shape?")                                      # the conversation goes on
    session.save("corrections.json")       # the conversation as a LLaVA-Instruct record (appended to a JSON list)
    session.set_image("other.jpg")         # a new conversation about another image
    session.stop()                         # from another thread (Ctrl-C): the current answer ends now

The image goes at the start of the first user turn (``<image>\\n`` + question), as LLaVA trains, and the
prompt is rendered by the model's own chat format (system prompt included), so a chat prompts the
model exactly as ``eval`` and training do. Greedy unless a temperature is set.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_llava.data.formats import IMAGE, Sample
from lora_llava.data.images import ImageError, ImageRef, load_image
from lora_llava.errors import UserError
from lora_llava.infer import Loaded, batch_inputs


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


class ChatSession:
    def __init__(self, loaded: Loaded, image: str | Path | None = None, settings: GenerationSettings | None = None):
        self.loaded = loaded
        self.settings = settings or GenerationSettings()
        self.messages: list[tuple[str, str]] = []
        self.image: Path | None = None
        self._stop = threading.Event()
        if image is not None:
            self.set_image(image)

    def set_image(self, path: str | Path) -> None:
        """Talk about ``path`` from now on: a new conversation (the image belongs to its first turn)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"image {str(path)!r} not found")
        try:
            load_image(p)
        except ImageError as e:
            raise UserError(f"image {str(path)!r}: {e}") from None
        self.image = p
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.messages = []

    def stop(self) -> None:
        """End the answer being generated (safe to call from another thread or a signal handler)."""
        self._stop.set()

    def ask(self, text: str, on_text: Callable[[str], object] | None = None) -> str:
        """The model's answer to ``text``, its pieces passed to ``on_text`` as they are generated."""
        pieces = []
        for piece in self.stream(text):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        return "".join(pieces).strip()

    def stream(self, text: str) -> Iterator[str]:
        """The pieces of the model's answer to ``text`` as they are generated; the answer joins the
        conversation once it is complete (stopping the iteration early stops the generation)."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        question = text.strip()
        if not self.messages and self.image is not None:
            question = f"{IMAGE}\n{question}"
        turns = [*self.messages, ("user", question)]
        images: list[ImageRef] = [self.image] if self.image is not None else []
        sample = Sample("chat", 0, "chat", [*turns, ("assistant", "")], images)
        inputs, _ = batch_inputs(self.loaded, [sample])
        tok = self.loaded.processor.tokenizer
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stop_flag = self._stop
        stop_flag.clear()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: object, scores: object, **kwargs: object) -> bool:
                return stop_flag.is_set()

        s = self.settings
        kwargs = dict(
            **inputs,
            max_new_tokens=s.max_new_tokens,
            do_sample=s.temperature > 0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted({tok.eos_token_id, self.loaded.encoder.stop_id} - {None}),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Stop()]),
        )
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.loaded.model.generate(**kwargs)
            except BaseException as e:  # surfaced in the calling thread
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces: list[str] = []
        try:
            for piece in streamer:
                if not "".join(pieces).strip():
                    piece = piece.lstrip()  # the answer's lead space, not shown
                pieces.append(piece)
                if piece:
                    yield piece
        finally:
            if worker.is_alive():
                stop_flag.set()
            worker.join()
        if errors:
            raise errors[0]
        self.messages = [*turns, ("assistant", "".join(pieces).strip())]

    def record(self, image_name: str | None = None, taken: Collection[str] = ()) -> dict:
        """The conversation as a LLaVA-Instruct record (``image_name``: its image, relative to the image folder),
        its id new: none of ``taken`` (the ids of the file it joins), see ``new_id``."""
        if not self.messages:
            raise UserError("nothing to save yet: ask something first")
        names = {"user": "human", "assistant": "gpt"}
        rec: dict = {"id": new_id(taken)}
        if self.image is not None:
            rec["image"] = image_name or self.image.name
        rec["conversations"] = [{"from": names[r], "value": t} for r, t in self.messages]
        return rec

    def save(self, path: str | Path) -> Path:
        """Append the conversation to the JSON list in ``path`` (created if missing), written whole.

        The file is training data as it stands: its image folder is the file's own folder, so an image
        from elsewhere is copied into ``images/`` beside it (``data.train.N.image_folder`` = that folder), under
        a name of its own (``x-2.png`` when another ``x.png`` is there). Saves never overwrite each other:
        each record gets an id of its own, and a save holds a lock on the folder (where the platform has
        ``flock``) from reading the file to replacing it, so two chats saving to one file both land in it.
        """
        p = Path(path).expanduser()
        if not self.messages:
            raise UserError("nothing to save yet: ask something first")
        try:
            folder = p.resolve().parent
            with _locked(folder):
                records = _saved_records(p)
                image_name = _copied_image(self.image, folder) if self.image is not None else None
                taken = {str(r["id"]) for r in records if isinstance(r, dict) and "id" in r}
                records.append(self.record(image_name, taken))
                tmp = p.with_name(f".{p.name}.tmp")
                tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False))
                tmp.replace(p)
        except OSError as e:
            raise UserError(f"cannot write {p}: {e.strerror or e}") from None
        return p


def new_id(taken: Collection[str] = ()) -> str:
    """``chat-20250101-120000-3fa9c2``: when it was saved, and 6 random hex digits, so that two saves in the
    same second never share an id (none of ``taken``, and across files and sessions but by a 1 in 16.7
    million chance; the data layer warns when two training sources share an id)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while True:
        candidate = f"chat-{stamp}-{secrets.token_hex(3)}"
        if candidate not in taken:
            return candidate


def _saved_records(p: Path) -> list:
    """The JSON list of records in ``p`` (none when it is missing); anything else is refused, never replaced."""
    if not p.exists():
        return []
    try:
        records = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} exists and is not a JSON list of records ({e})", hint="save to a new file") from None
    if not isinstance(records, list):
        raise UserError(f"{p} exists and is not a JSON list of records", hint="save to a new file")
    return records


def _copied_image(image: Path, folder: Path) -> str:
    """``image`` as the saved file's folder names it: its path under ``folder``, or else a copy in
    ``folder/images`` under its own name, or ``<stem>-2<suffix>``, ``-3``, ... when another image has it
    (a copy with the same bytes is reused)."""
    image = image.resolve()
    if image.is_relative_to(folder):
        return str(image.relative_to(folder))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = image.read_bytes()
    target, n = folder / "images" / image.name, 1
    while target.exists() and target.read_bytes() != data:
        n += 1
        target = folder / "images" / f"{image.stem}-{n}{image.suffix}"
    if not target.exists():
        target.write_bytes(data)
    return str(target.relative_to(folder))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` while the block runs (saves into it one at a time, across processes);
    a no-op where there is no fcntl (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
