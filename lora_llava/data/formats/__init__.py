"""Read training data of every supported format into one conversation type, reporting every bad sample.

Usage::

    samples, bad = read_source(DataSource(path="train.json", image_folder="images"))
    for b in bad: print(b.describe())            # 'train.json sample 3 (id x): image 'a.png' not found in ...'

    reader = open_source(DataSource(path="vqa.parquet", format="messages"))
    read = reader.read([0, 1, 2])                # selected records -> read.samples, read.bad, read.warnings

Formats (``data.*.format``; ``auto`` picks one from the records):

- ``llava``: LLaVA-Instruct ``{"id", "image" (optional; a path or a list), "conversations": [{"from", "value"}]}``
- ``sharegpt``: text-only conversations, turns ``{"from", "value"}`` or ``{"role", "content"}``
- ``messages``: TRL/OpenAI ``{"messages": [{"role", "content"}], "images": [...]}`` where content is a
  string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items

stored as JSON (a list), JSONL (one a line), parquet, or a ``datasets`` ``save_to_disk`` folder.
Images are paths relative to ``image_folder`` (confined to it) or, in `datasets` data, images stored
in the rows. Other field and speaker names are mapped with ``columns`` and ``roles``. See
:mod:`lora_llava.data.formats.conversation` for the turn and ``<image>`` rules.
"""

from lora_llava.data.formats.reader import SourceRead, SourceReader, open_source, read_source
from lora_llava.data.formats.sample import IMAGE, BadSample, Sample

__all__ = ["IMAGE", "BadSample", "Sample", "SourceRead", "SourceReader", "open_source", "read_source"]
