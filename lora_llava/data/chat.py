"""Chat formats: render a conversation exactly as a checkpoint was trained, and know which characters carry loss.

Usage::

    fmt = chat_format("vicuna_v1")
    text, spans = fmt.render([("user", "<image>\\nWhat color?"), ("assistant", "Red")])
    # text  == "A chat between ... questions. USER: <image>\\nWhat color? ASSISTANT: Red</s>"
    # spans == [(len(text) - 8, len(text))]  -> " Red</s>": everything generated after "ASSISTANT:"
    prompt, _ = fmt.render([("user", "What color?")], add_generation_prompt=True)   # ends with "ASSISTANT:"
    chat_format("vicuna_v1", system="")       # the same format without its system prompt

Each format renders what its checkpoints were trained with (upstream LLaVA's ``conversation.py``):

- ``vicuna_v1`` (LLaVA-1.5, LLaVA-NeXT-Vicuna): the Vicuna system prompt, one space, then
  ``USER: Q ASSISTANT: A</s>`` per exchange;
- ``mistral_instruct`` (LLaVA-NeXT-Mistral): ``[INST] Q [/INST] A </s>`` with a system prompt (none by
  default) wrapped as ``<<SYS>>\\n...\\n<</SYS>>\\n\\n`` inside the first ``[INST]``;
- ``chatml_direct`` (LLaVA-NeXT-34B / Yi): system ``Answer the questions.``, turns
  ``<|im_start|>role\\n...<|im_end|>`` with no newline between them;
- ``chatml`` (Qwen2 and other ChatML LMs): the same with a newline after each ``<|im_end|>``, no system
  prompt by default;
- ``llama3``: Llama-3 headers;
- ``plain`` (LLaVA-1.5 stage 1, feature alignment): the image, the caption, ``\\n``; no roles, no
  instruction (the user turn's text is not rendered).

A conversation's own system turn replaces the format's default system prompt.

The loss covers every token the model must generate after the generation prompt: the answer's
first piece (including a space that tokenizes on its own, ``Ġ`` in byte-level BPE, ``▁`` before a
digit in Llama's sentencepiece), the answer, and its stop token. Rendering segment by segment gives
those character spans by construction, whatever the tokenizer; ``tokenize_with_labels`` labels
exactly the tokens inside them. ``jinja`` is the equivalent transformers chat template, saved with
every processor lora_llava writes, so ``apply_chat_template`` builds the same prompt at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from lora_llava.annotations import Tokenizer
from lora_llava.config.schema import ConversationFormatName
from lora_llava.errors import UserError

Message = tuple[str, str]  # (role, text) with role in system | user | assistant
IMAGE = "<image>"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str  # the generation prompt; everything after it is generated (and labelled)
    stop: str  # ends each answer; generated and labelled
    answer_lead: str = " "  # generated before the answer text (a token of its own in many tokenizers)
    answer_tail: str = ""  # generated between the answer text and the stop (mistral_instruct's space)
    assistant_suffix: str = ""  # rendered after the stop, not generated (ChatML's newline)
    system: str = ""  # the default system prompt, used when a conversation has no system turn
    system_prefix: str = ""
    system_suffix: str = ""
    system_in_first_user: bool = False  # LLaMA-2 style: the wrapped system prompt opens the first user turn
    user_images_only: bool = False  # plain: a user turn renders only its <image> placeholders
    single_exchange: bool = False  # plain: exactly one user turn and one answer
    markers: tuple[str, ...] = ()  # the format's own role markers: never allowed inside a turn's text

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Return ``(text, target_spans)``; spans are [start, end) character ranges of what is generated."""
        system = self.system
        if messages and messages[0][0] == "system":
            system, messages = messages[0][1], messages[1:]
        self._check_shape(messages, add_generation_prompt)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0

        def emit(s: str) -> None:
            nonlocal pos
            parts.append(s)
            pos += len(s)

        wrapped_system = self.system_prefix + system + self.system_suffix if system else ""
        if not self.system_in_first_user:
            emit(wrapped_system)
        first_user = True
        for role, content in messages:
            if role == "user":
                if self.user_images_only:
                    content = IMAGE * content.count(IMAGE)
                if first_user and self.system_in_first_user:
                    content = wrapped_system + content
                first_user = False
                emit(self.user_prefix + content + self.user_suffix)
            elif role == "assistant":
                emit(self.assistant_prefix)
                start = pos
                emit(self.answer_lead + content + self.answer_tail + self.stop)
                spans.append((start, pos))
                emit(self.assistant_suffix)
            elif role == "system":
                raise ValueError("a system turn is only allowed first")
            else:
                raise UserError(f"unknown chat role {role!r}: expected system, user or assistant")
        if add_generation_prompt:
            emit(self.assistant_prefix)
        return "".join(parts), spans

    def _check_shape(self, messages: list[Message], add_generation_prompt: bool) -> None:
        if not self.single_exchange:
            return
        roles = [r for r, _ in messages]
        expected = ["user"] if add_generation_prompt else ["user", "assistant"]
        if roles != expected:
            raise ValueError(
                f"chat format {self.name} (stage-1 alignment) takes one image and one caption per sample; this "
                f"sample has {roles.count('assistant')} answers"
            )
        if IMAGE not in messages[0][1]:
            raise ValueError(f"chat format {self.name} (stage-1 alignment) needs an image in every sample")

    @property
    def generation_prompt(self) -> str:
        return self.assistant_prefix

    @property
    def jinja(self) -> str:
        """A transformers chat template producing exactly ``render``'s text (default system prompt included).

        Message content may be a string (with ``<image>`` placeholders) or a list of
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` items (images first).
        """

        def q(s: str) -> str:
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

        def text_of(m: str) -> str:
            """Set ns.c to the text of message ``m`` (images as <image>\\n in front)."""
            return (
                f"{{% set ns.c = '' %}}{{% if {m}['content'] is string %}}{{% set ns.c = {m}['content'] %}}"
                f"{{% else %}}{{% for item in {m}['content'] %}}{{% if item['type'] == 'image' %}}"
                f"{{% set ns.c = ns.c + '<image>\\n' %}}{{% endif %}}{{% endfor %}}"
                f"{{% for item in {m}['content'] %}}{{% if item['type'] == 'text' %}}"
                f"{{% set ns.c = ns.c + item['text'] %}}{{% endif %}}{{% endfor %}}{{% endif %}}"
            )

        wrapped = f"({q(self.system_prefix)} + ns.sys + {q(self.system_suffix)} if ns.sys else '')"
        user_content = "('<image>' * ns.c.count('<image>'))" if self.user_images_only else "ns.c"
        if self.system_in_first_user:
            user_content = f"(({wrapped} if ns.first else '') + {user_content})"
        return (
            f"{{% set ns = namespace(c='', sys={q(self.system)}, first=true, start=0) %}}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            + text_of("messages[0]")
            + "{% set ns.sys = ns.c %}{% set ns.start = 1 %}{% endif %}"
            + ("" if self.system_in_first_user else f"{{{{ {wrapped} }}}}")
            + "{% for message in messages[ns.start:] %}"
            + text_of("message")
            + "{% if message['role'] == 'user' %}"
            + f"{{{{ {q(self.user_prefix)} + {user_content} + {q(self.user_suffix)} }}}}"
            + "{% set ns.first = false %}"
            + "{% elif message['role'] == 'assistant' %}"
            + f"{{{{ {q(self.assistant_prefix)} }}}}{{% generation %}}"
            + f"{{{{ {q(self.answer_lead)} + ns.c + {q(self.answer_tail + self.stop)} }}}}"
            + f"{{% endgeneration %}}{{{{ {q(self.assistant_suffix)} }}}}"
            + "{% else %}{{ raise_exception('a system turn is only allowed first') }}{% endif %}"
            + "{% endfor %}"
            + f"{{% if add_generation_prompt %}}{{{{ {q(self.assistant_prefix)} }}}}{{% endif %}}"
        )


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_FORMATS: dict[str, dict] = {
    # LLaVA-1.5 / LLaVA-NeXT-Vicuna (upstream conv_vicuna_v1):
    # "<system> USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"
    "vicuna_v1": dict(
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        stop="</s>",
        system=VICUNA_SYSTEM,
        system_suffix=" ",
        markers=("USER:", "ASSISTANT:"),
    ),
    # LLaVA-NeXT-Mistral (upstream conv_mistral_instruct, LLaMA-2 separators):
    # "[INST] <<SYS>>\nsys\n<</SYS>>\n\n<image>\nQ [/INST] A </s>[INST] Q2 [/INST] A2 </s>"
    "mistral_instruct": dict(
        user_prefix="[INST] ",
        user_suffix=" [/INST]",
        assistant_prefix="",
        answer_tail=" ",
        stop="</s>",
        system_prefix="<<SYS>>\n",
        system_suffix="\n<</SYS>>\n\n",
        system_in_first_user=True,
        markers=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    ),
    # LLaVA-NeXT-34B / Nous-Hermes-2-Yi-34B (upstream conv_chatml_direct): no newline after <|im_end|>
    # "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
    "chatml_direct": dict(
        system="Answer the questions.",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>",
        assistant_prefix="<|im_start|>assistant\n",
        answer_lead="",
        stop="<|im_end|>",
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    # ChatML LMs (Qwen2, ...) and LLaVA-NeXT's Qwen template (upstream conv_qwen), with its default system prompt,
    # the one Qwen2's own chat template adds when a conversation has none:
    # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    "chatml": dict(
        system="You are a helpful assistant.",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_lead="",
        stop="<|im_end|>",
        assistant_suffix="\n",
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    # Llama-3, as LLaVA-NeXT's Llama-3 template (upstream conv_llava_llama_3) with its default system prompt:
    # "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. ...<|eot_id|>
    #  <|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant..."
    "llama3": dict(
        system=(
            "You are a helpful language and vision assistant. You are able to understand the visual content that "
            "the user provides, and assist the user with a variety of tasks using natural language."
        ),
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
        system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
        user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_lead="",
        stop="<|eot_id|>",
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    # LLaVA-1.5 stage 1 (upstream conv_llava_plain): "<image>" + caption + "\n"
    "plain": dict(
        user_prefix="",
        user_suffix="",
        assistant_prefix="",
        answer_lead="",
        stop="\n",
        user_images_only=True,
        single_exchange=True,
    ),
}

# the names, as types (recipe keys are checked against them); _FORMATS must define exactly these
CHAT_FORMATS: tuple[str, ...] = tuple(_FORMATS)
CONVERSATION_FORMATS: tuple[str, ...] = get_args(ConversationFormatName)
if set(_FORMATS) != {*CONVERSATION_FORMATS, "plain"}:
    raise ImportError(f"chat formats defined {sorted(_FORMATS)} but named {sorted(CONVERSATION_FORMATS)} + plain")
# formats whose answers end with the tokenizer's own EOS token (its spelling differs between tokenizers)
EOS_STOP_FORMATS = {"vicuna_v1", "mistral_instruct"}


def chat_format(name: str, stop: str | None = None, system: str | None = None) -> ChatFormat:
    """The chat format ``name``; ``stop`` overrides its stop string, ``system`` its default system prompt."""
    if name not in _FORMATS:
        raise UserError(f"unknown chat format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    kw = dict(_FORMATS[name])
    if stop is not None:
        kw["stop"] = stop
    if system is not None:
        kw["system"] = system
    return ChatFormat(name=name, **kw)


def default_system(name: str) -> str:
    """The system prompt format ``name`` renders when a conversation has none."""
    return _FORMATS[name].get("system", "")


def stop_token_id(tokenizer: Tokenizer, stop: str) -> int | None:
    """The id of the single token ``stop`` becomes at the end of an answer, or None when it is not one token."""
    ids = tokenizer.encode("A" + stop, add_special_tokens=False)
    if not ids:
        return None
    last = ids[-1]
    if tokenizer.decode([last]) == stop or tokenizer.convert_ids_to_tokens(last) == stop:
        return last
    return None


def tokenize_with_labels(
    tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]], stop_id: int | None
) -> tuple[list[int], list[int]]:
    """Tokenize ``text``; label (= copy) exactly the tokens that start inside ``spans``, -100 elsewhere.

    Raises ``ValueError`` when the rendered text cannot be aligned with the tokens: a span with no
    token, a token that joins the generation prompt and the answer (the prompt alone would tokenize
    differently, so what the model must generate is ill-defined), or a span whose last token is not
    the stop token. A misaligned template therefore fails loudly instead of silently training on
    nothing (or on the prompt).
    """
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    labels = [-100] * len(ids)
    for start, end in spans:
        hit = []
        for i, (a, b) in enumerate(offsets):
            if b <= a:
                continue  # added by the post-processor (BOS), not in the text
            if a < start < b:
                raise ValueError(
                    f"token {tokenizer.convert_ids_to_tokens(ids[i])!r} at characters {a}-{b} joins the generation "
                    f"prompt and the answer at character {start}: the chat format does not match the tokenizer"
                )
            if start <= a < end:
                hit.append(i)
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


def format_for(name: str, tokenizer: Tokenizer, system: str | None = None) -> ChatFormat:
    """The chat format ``name`` with the stop string this tokenizer ends answers with (and ``system``)."""
    return chat_format(name, stop=tokenizer.eos_token if name in EOS_STOP_FORMATS else None, system=system)
