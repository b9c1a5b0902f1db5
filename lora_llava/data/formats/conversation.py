"""One record (a mapping) -> ``(id, messages, images)``, or ``ValueError`` naming what is wrong with it.

Usage::

    spec = RecordSpec.for_source(DataSource(path="x.json"), "llava")
    sid, messages, images = parse_record(record, spec, image_folder="images", check_images=True)
    parse_record(record, spec, "hub/snapshots/abc", True, image_roots=["hub"])   # links may point into hub/

A record holds a list of turns (``conversations``; ``messages`` in format messages). A turn names
its speaker under ``from`` (else ``role``) and holds its text under ``value`` (else ``content``);
``columns`` and ``roles`` in the recipe map other names. Text is a string, or a list of content
items ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` (TRL/OpenAI style); each image item
becomes an ``<image>`` placeholder at the start of its turn, texts are joined as they are, which is
how the chat template saved with every adapter renders such content.

The ``<image>`` rule: a sample with N images needs N placeholders in its human turns, or none at
all, in which case they are put at the start of the first human turn. A single image's placeholder
is moved to the start of the turn that holds it (LLaVA-1.5's "image first", as its own preprocessing
does; the chat template saved with every adapter renders an image at the start of its turn too, so
training and serving see the same text). A placeholder without an image, or in an answer, is an error.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_llava.config.schema import DataSource
from lora_llava.data.formats.sample import IMAGE
from lora_llava.data.images import EmbeddedImage, ImageError, ImageRef, load_image, quoted, resolve_image_path
from lora_llava.errors import UserError

BUILTIN_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class RecordSpec:
    """Where a format (and the recipe's ``columns``/``roles``) finds each part of a record."""

    format: str  # llava | sharegpt | messages
    id_key: str
    conversations_key: str
    image_key: str | None  # None: text-only (sharegpt)
    role_key: str | None  # None: from, else role
    text_key: str | None  # None: value, else content
    roles: dict[str, str]

    @classmethod
    def for_source(cls, src: DataSource, fmt: str) -> RecordSpec:
        c = src.columns
        if fmt == "sharegpt" and c.image is not None:
            raise UserError(
                f"data source {src.path!r}: columns.image is set but format sharegpt is text-only",
                hint="use format: llava (or messages) for samples with images",
            )
        roles = dict(BUILTIN_ROLES)
        for role in ("user", "assistant", "system"):
            for name in getattr(src.roles, role):
                roles[name] = role
        default_conv, default_image = ("messages", "images") if fmt == "messages" else ("conversations", "image")
        return cls(
            format=fmt,
            id_key=c.id or "id",
            conversations_key=c.conversations or default_conv,
            image_key=None if fmt == "sharegpt" else c.image or default_image,
            role_key=c.role,
            text_key=c.text,
            roles=roles,
        )

    def turn_keys(self, turn: dict) -> tuple[str, str]:
        """The (speaker, text) keys of one turn: the mapped ones, else from/value or role/content."""
        first, second = (
            (("role", "content"), ("from", "value"))
            if self.format == "messages"
            else (
                ("from", "value"),
                ("role", "content"),
            )
        )
        role = self.role_key or (
            second[0] if turn.get(first[0]) is None and turn.get(second[0]) is not None else first[0]
        )
        text = self.text_key or (
            second[1] if turn.get(first[1]) is None and turn.get(second[1]) is not None else first[1]
        )
        return role, text


def _content_text(content: Any, t: int, key: str, inline: list) -> str:
    """A turn's text: a string as is; a content list as '<image>\\n' per image item, then its texts.

    Image items that carry their image (TRL's ``{"type": "image", "image": "a.png"}``, OpenAI's
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``) add it to ``inline``.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"turn {t}: {key!r} must be a string or a list of content items, got {type(content).__name__}")
    images, texts = 0, []
    for k, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("image", "image_url"):
            images += 1
            ref = _inline_image(item, kind, t, k)
            if ref is not None:
                inline.append(ref)
        elif kind == "text":
            if not isinstance(item.get("text"), str):
                raise ValueError(f"turn {t}: content item {k} of type text needs a string 'text'")
            texts.append(item["text"])
        else:
            raise ValueError(f"turn {t}: content item {k} has type {kind!r}; expected 'text', 'image' or 'image_url'")
    return (IMAGE + "\n") * images + "".join(texts)


def _inline_image(item: dict, kind: str, t: int, k: int) -> Any:
    """The image an image item carries (a path, embedded bytes), or None when it only marks a place."""
    value = item.get("image") if kind == "image" else item.get("image_url")
    if isinstance(value, dict):
        if kind == "image_url":
            value = value.get("url")
        else:  # datasets' layout {bytes, path}: the bytes when stored, else the path
            if value.get("bytes") is None and value.get("path") is None:
                raise ValueError(f"turn {t}: content item {k}: its image has neither bytes nor a path (both null)")
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if value is None or isinstance(value, EmbeddedImage):
        return value
    if isinstance(value, (bytes, bytearray)):
        return InlineImage(f"turn {t} item {k}", bytes(value))
    if not isinstance(value, str):
        raise ValueError(f"turn {t}: content item {k}: its image must be a path, a data URL or bytes")
    if value.startswith("data:"):
        head, _, data = value.partition(",")
        if ";base64" not in head:
            raise ValueError(f"turn {t}: content item {k}: a data URL image must be base64")
        try:
            return InlineImage(f"turn {t} item {k}", base64.b64decode(data, validate=True))
        except ValueError:
            raise ValueError(f"turn {t}: content item {k}: its data URL is not valid base64") from None
    if value.startswith("file://"):
        return value[len("file://") :]
    return value  # a path (URLs are refused where paths are resolved)


@dataclass(frozen=True)
class InlineImage:
    """An image whose encoded bytes a record holds (a base64 data URL, raw bytes)."""

    name: str
    data: bytes = field(repr=False)

    def read_bytes(self) -> bytes:
        return self.data


def _messages(rec: dict, spec: RecordSpec, inline: list) -> list[tuple[str, str]]:
    key = spec.conversations_key
    conv = rec.get(key)
    if conv is None and key in rec:
        raise ValueError(f"missing field {key!r} (it is null)")
    if conv is None:
        names = list(getattr(rec, "field_names", None) or rec)  # a row read from some columns names them all
        fields = ", ".join(repr(k) for k in names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"missing field {key!r} (the record has {fields or 'no fields'}; "
            f"name the turns field with data.*.columns: {{conversations: <field>}})"
        )
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{key!r} is empty or not a list")
    messages: list[tuple[str, str]] = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {t} must be an object, got {type(turn).__name__}")
        role_key, text_key = spec.turn_keys(turn)
        if turn.get(role_key) is None or text_key not in turn or turn[text_key] is None:
            raise ValueError(f"turn {t} needs {role_key!r} and {text_key!r}")
        speaker = turn[role_key]
        role = spec.roles.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ValueError(
                f"turn {t}: unknown speaker {speaker!r} (human, gpt, system; map others with data.*.roles)"
            )
        if isinstance(turn[text_key], list):
            text = _content_text(turn[text_key], t, text_key, inline)
        elif not isinstance(turn[text_key], str):
            raise ValueError(f"turn {t}: {text_key!r} must be a string, got {type(turn[text_key]).__name__}")
        else:
            text = turn[text_key]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON escapes can hold lone surrogates, which no tokenizer takes
            raise ValueError(f"turn {t}: text is not valid Unicode ({e.reason} at character {e.start})") from None
        messages.append((role, text))
    body = messages[1:] if messages[0][0] == "system" else messages
    if any(r == "system" for r, _ in body):
        raise ValueError("a system turn may only come first")
    for t, (role, _) in enumerate(body):
        if role != ("user" if t % 2 == 0 else "assistant"):
            raise ValueError(
                f"wrong role order at turn {t + len(messages) - len(body)}: turns must alternate human, gpt, ..."
            )
    if not body or body[-1][0] != "assistant":
        raise ValueError("no answer to learn: the conversation must end with a gpt turn")
    if any(not v.strip() for r, v in body if r == "assistant"):
        raise ValueError("an answer is empty: nothing to learn")
    return messages


def _image_values(rec: dict, spec: RecordSpec) -> list:
    if spec.image_key is None:
        found = [k for k in ("image", "images") if rec.get(k) not in (None, [])]
        if found:
            raise ValueError(f"has {found[0]!r} but format sharegpt is text-only; use format llava or messages")
        return []
    key = spec.image_key
    value = rec.get(key)
    if value is None:
        return []
    if isinstance(value, list):
        return [_image_value(v, f"{key!r} item {i}", key) for i, v in enumerate(value)]
    return [_image_value(value, repr(key), key)]


def _image_value(v: Any, where: str, key: str) -> Any:
    """A path or an embedded image; a `datasets` Image cell ``{"bytes", "path"}`` gives its bytes when it
    holds them, else its path (resolved against the image folder like any path)."""
    if isinstance(v, (str, EmbeddedImage)):
        return v
    if isinstance(v, dict) and v and set(v) <= {"bytes", "path"}:
        data, path = v.get("bytes"), v.get("path")
        if isinstance(data, (bytes, bytearray)):
            return InlineImage(where.replace("'", ""), bytes(data))
        if data is None and isinstance(path, str):
            return path
        if data is None and path is None:
            raise ValueError(f"{where}: an image with neither bytes nor a path (both null)")
    raise ValueError(f"{key!r} must be a path or a list of paths")


def parse_record(
    rec: object, spec: RecordSpec, image_folder: str | None, check_images: bool, image_roots: Sequence[str] = ()
) -> tuple[str | None, list[tuple[str, str]], list[ImageRef]]:
    """Validate one record; return (id, messages, images) or raise ValueError with the reason. Image paths
    resolve in ``image_folder``; their links may point there or into ``image_roots``."""
    if isinstance(rec, ValueError):
        raise rec
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    sid = rec.get(spec.id_key)
    sid = None if sid is None else str(sid)
    inline: list = []
    messages = _messages(rec, spec, inline)
    values = _image_values(rec, spec)
    if inline and values:
        raise ValueError(f"images given both in {spec.image_key!r} and inside content items; give them one way")
    values = values or inline
    placeholders = sum(v.count(IMAGE) for r, v in messages if r != "assistant")
    if any(IMAGE in v for r, v in messages if r == "assistant"):
        raise ValueError(f"{IMAGE} in an answer")
    if placeholders and placeholders != len(values):
        what = "no image" if not values else f"{len(values)} image(s)"
        raise ValueError(f"{placeholders} {IMAGE} placeholder(s) but {what}")
    images: list[ImageRef] = []
    for v in values:
        try:
            ref = v if isinstance(v, EmbeddedImage) else resolve_image_path(v, image_folder, image_roots)
        except ImageError as e:
            raise ValueError(str(e)) from None
        if check_images:
            try:
                load_image(ref)
            except ImageError as e:
                raise ValueError(f"image {quoted(v)}: {e}") from None
        images.append(ref)
    if images and placeholders == 0:  # no placeholder: every image opens the first human turn
        first = next(i for i, (r, _) in enumerate(messages) if r == "user")
        role, text = messages[first]
        messages[first] = (role, (IMAGE + "\n") * len(images) + text)
    elif len(images) == 1:  # image first: the single placeholder opens the turn that holds it
        messages = [(r, IMAGE + "\n" + v.replace(IMAGE, "").strip()) if IMAGE in v else (r, v) for r, v in messages]
    return sid, messages, images
