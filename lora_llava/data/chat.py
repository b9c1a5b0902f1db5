"""Chat formats: render a conversation to text and know exactly which characters carry loss.

Usage::

    fmt = chat_format("vicuna_v1")
    text, spans = fmt.render([("user", "<image>\\nWhat color?"), ("assistant", "Red")])
    # text  == "USER: <image>\\nWhat color? ASSISTANT: Red</s>"
    # spans == [(33, 39)]   -> "Red</s>": the answer and its stop string
    prompt, _ = fmt.render([("user", "What color?")], add_generation_prompt=True)

The loss LLaVA trains with covers the assistant answers and their stop token only. Rendering
segment by segment gives those character spans by construction, whatever the tokenizer; the
collator then labels exactly the tokens inside them (see ``tokenize_with_labels``). ``jinja`` is
the equivalent chat template saved with every processor lora_llava writes, so plain transformers'
``apply_chat_template`` builds the same prompt at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_llava.errors import UserError

Message = tuple[str, str]  # (role, text) with role in system | user | assistant


@dataclass(frozen=True)
class ChatFormat:
    name: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str  # the generation prompt; the answer follows after answer_lead
    stop: str  # rendered right after each answer, and trained on
    system_prefix: str = ""
    system_suffix: str = " "
    answer_lead: str = " "  # joins the generation prompt and the answer (part of the answer's first token)
    assistant_suffix: str = ""  # rendered after the stop string, not trained (ChatML's newline)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Return ``(text, target_spans)``; spans are [start, end) character ranges of answer + stop."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0

        def emit(s: str) -> None:
            nonlocal pos
            parts.append(s)
            pos += len(s)

        for role, content in messages:
            if role == "system":
                emit(self.system_prefix + content + self.system_suffix)
            elif role == "user":
                emit(self.user_prefix + content + self.user_suffix)
            elif role == "assistant":
                emit(self.assistant_prefix + self.answer_lead)
                start = pos
                emit(content + self.stop)
                spans.append((start, pos))
                emit(self.assistant_suffix)
            else:
                raise UserError(f"unknown chat role {role!r}: expected system, user or assistant")
        if add_generation_prompt:
            emit(self.assistant_prefix)
        return "".join(parts), spans

    @property
    def generation_prompt(self) -> str:
        return self.assistant_prefix

    @property
    def jinja(self) -> str:
        """A transformers chat template producing exactly ``render``'s text.

        Message content may be a string (with ``<image>`` placeholders) or a list of
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items (images first).
        """

        def q(s: str) -> str:
            return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")

        content = (
            "{% set ns = namespace(c='') %}"
            "{% if message['content'] is string %}{% set ns.c = message['content'] %}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
            "{% set ns.c = ns.c + '<image>\\n' %}{% endif %}{% endfor %}"
            "{% for item in message['content'] %}{% if item['type'] == 'text' %}"
            "{% set ns.c = ns.c + item['text'] %}{% endif %}{% endfor %}{% endif %}"
        )
        return (
            "{% for message in messages %}"
            + content
            + "{% if message['role'] == 'system' %}{{ '"
            + q(self.system_prefix)
            + "' + ns.c + '"
            + q(self.system_suffix)
            + "' }}"
            + "{% elif message['role'] == 'user' %}{{ '"
            + q(self.user_prefix)
            + "' + ns.c + '"
            + q(self.user_suffix)
            + "' }}"
            + "{% else %}{{ '"
            + q(self.assistant_prefix + self.answer_lead)
            + "' }}{% generation %}{{ ns.c + '"
            + q(self.stop)
            + "' }}{% endgeneration %}{{ '"
            + q(self.assistant_suffix)
            + "' }}{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}{{ '"
            + q(self.assistant_prefix)
            + "' }}{% endif %}"
        )


_FORMATS: dict[str, dict] = {
    # LLaVA-1.5 / LLaVA-NeXT-Vicuna: "USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"
    "vicuna_v1": dict(user_prefix="USER: ", user_suffix=" ", assistant_prefix="ASSISTANT:", stop="</s>"),
    # LLaVA-NeXT-Mistral: "[INST] <image>\nQ [/INST] A</s>[INST] Q2 [/INST] A2</s>"
    "mistral_instruct": dict(
        user_prefix="[INST] ", user_suffix=" [/INST]", assistant_prefix="", stop="</s>", system_suffix="\n\n"
    ),
    # ChatML (LLaVA-NeXT-34B / Yi, Qwen2): "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    "chatml": dict(
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_lead="",
        stop="<|im_end|>",
        assistant_suffix="\n",
    ),
    # Llama-3: "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant..."
    "llama3": dict(
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
        system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
        user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_lead="",
        stop="<|eot_id|>",
    ),
}

# The stop string each format ends an answer with is that format's own; only vicuna_v1 and
# mistral_instruct use the tokenizer's EOS token.
EOS_STOP_FORMATS = {"vicuna_v1", "mistral_instruct"}


def chat_format(name: str, stop: str | None = None) -> ChatFormat:
    """The chat format ``name``; ``stop`` overrides its stop string (a tokenizer's EOS token)."""
    if name not in _FORMATS:
        raise UserError(f"unknown chat format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    kw = dict(_FORMATS[name])
    if stop is not None:
        kw["stop"] = stop
    return ChatFormat(name=name, **kw)


def tokenize_with_labels(tokenizer, text: str, spans: list[tuple[int, int]], stop_id: int | None):
    """Tokenize ``text``; label (= copy) exactly the tokens overlapping ``spans``, -100 elsewhere.

    Raises ``ValueError`` when the rendered text cannot be aligned with the tokens: a span with no
    token, or a span whose last token is not the stop token. A misaligned template therefore fails
    loudly instead of silently training on nothing (or on the prompt).
    """
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    labels = [-100] * len(ids)
    for start, end in spans:
        hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not hit:
            raise ValueError(f"answer at characters {start}-{end} maps to no token")
        if stop_id is not None and ids[hit[-1]] != stop_id:
            raise ValueError(
                f"answer at characters {start}-{end} does not end with the stop token id {stop_id} "
                f"(got {ids[hit[-1]]}): the chat format does not match the tokenizer"
            )
        for i in hit:
            labels[i] = ids[i]
    return ids, labels


def format_for(name: str, tokenizer) -> ChatFormat:
    """The chat format ``name`` with the stop string this tokenizer ends answers with."""
    return chat_format(name, stop=tokenizer.eos_token if name in EOS_STOP_FORMATS else None)
