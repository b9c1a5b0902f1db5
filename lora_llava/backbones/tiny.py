"""Built-in offline backbones, small enough for a laptop CPU.

Usage::

    from lora_llava.backbones.tiny import ensure_tiny
    path = ensure_tiny("tiny")      # builds once into the cache, then reuses it
    LlavaForConditionalGeneration.from_pretrained(path)

- ``tiny``: LLaVA-1.5-shaped (CLIP 32 px / 8 px patches, 2-layer GELU MLP projector, LLaMA 64-d);
- ``tiny-sp``: ``tiny`` with a sentencepiece-style tokenizer (Metaspace, split digits, byte fallback),
  the tokenization of the Llama / Vicuna / Mistral LMs of real LLaVA checkpoints;
- ``tiny-next``: LLaVA-NeXT-shaped, AnyRes over 32 px tiles (grid pinpoints up to 96 px), image newline;
- ``tiny-clip`` and ``tiny-qwen2``: a stand-alone CLIP vision encoder and a Qwen2 causal LM with a
  ChatML tokenizer, the parts from which a new LLaVA is assembled.

Everything is made locally and deterministically: BPE tokenizers trained on a fixed corpus
(byte-level or sentencepiece-style with LLaMA-style ``<s>``/``</s>``/``<image>`` specials and a BOS
post-processor, or byte-level with ChatML specials), CLIP image processors, and random-init models from fixed seeds. Building twice gives
bit-identical files, so a run directory that names a built-in backbone is reproducible anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_llava.annotations import Model, Processor, Tokenizer
from lora_llava.fsutil import cache_root
from lora_llava.layout import MODEL_CONFIG_FILE

TINY_VERSION = "3"
IMAGE_SIZE = 32
PATCH_SIZE = 8

_WORDS = (
    "the a an of and to in is it that what which color colour shape image picture photo this there "
    "red green blue yellow purple orange black white gray grey brown pink cyan magenta "
    "circle square triangle star cross ring disk box dot line "
    "question answer answers using single word phrase describe briefly short long yes no "
    "how many where left right top bottom center middle small large big tiny object objects "
    "user assistant system human gpt please tell me you can see look at shown drawn"
)


def _corpus() -> list[str]:
    words = _WORDS.split()
    lines = [" ".join(words)]
    lines += [f"USER: What {w} is the shape? ASSISTANT: {w.capitalize()}." for w in words]
    lines += [f"{a} {b} {c}" for a, b, c in zip(words, words[1:], words[2:])]
    lines += ["Answer the question using a single word or phrase.", "0 1 2 3 4 5 6 7 8 9 10 ? ! , . : ; ' \""]
    return lines * 4


def build_tokenizer(style: str = "llama") -> Tokenizer:
    """A fast tokenizer trained on a fixed corpus.

    ``llama``: byte-level BPE, ``<s>`` added in front, ``</s>`` ends answers, ``<image>`` special
    (LLaVA-1.5/NeXT layout; a space before a word is ``Ġ``, merged into the word when the pair is known).
    ``sentencepiece``: the tokenization of Llama / Vicuna / Mistral: Metaspace (``▁`` for spaces, one
    prepended to the text), every digit a token of its own (so `` 2`` is ``▁``, ``2``), byte fallback
    (``<0x0A>`` for a newline, UTF-8 bytes for any character outside the vocabulary); same specials.
    ``chatml``: byte-level BPE, no BOS, ``<|im_start|>``/``<|im_end|>`` specials, ``<|im_end|>`` is EOS
    (Qwen2-like causal LM, no image token: assembling a LLaVA adds it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "chatml":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    if style == "sentencepiece":
        tok = _sentencepiece_model(specials)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=640,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)
    if style == "chatml":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>"],
            model_max_length=1024,
            padding_side="right",
        )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=1024,
        padding_side="right",
    )


def _sentencepiece_model(specials: list[str]) -> Any:
    """A Llama-style BPE: merges learned within words (``▁`` starts a word), digits split, byte fallback."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    def pre() -> Any:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre()
    learner.train_from_iterator(
        _corpus(), trainer=trainers.BpeTrainer(vocab_size=640, special_tokens=specials, show_progress=False)
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def build_image_processor() -> Any:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )


def _text_config(tokenizer: Tokenizer, model_type: str = "llama", hidden: int = 64) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,  # logits sharp enough for a frozen random LM head to be steered
        tie_word_embeddings=False,
    )


def _vision_config() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )


def _save(out_dir: str | os.PathLike, model: Model, processor: Processor) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _generation_ids(model: Model, tokenizer: Tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def _llava_config_kwargs(tokenizer: Tokenizer) -> dict:
    """What tiny and tiny-next share: the CLIP tower, the LLaMA LM, a GELU MLP projector on layer -2."""
    return dict(
        vision_config=_vision_config(),
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _processor_kwargs(tokenizer: Tokenizer) -> dict:
    from lora_llava.data.chat import chat_format

    return dict(
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_format("vicuna_v1").jinja,
    )


def build_tiny(out_dir: str | os.PathLike, tokenizer_style: str = "llama") -> Path:
    """The ``tiny`` backbone: LLaVA-1.5-shaped (CLIP, 2-layer GELU MLP projector, LLaMA)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(tokenizer_style)
    config = LlavaConfig(
        **_llava_config_kwargs(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float().eval()
    _generation_ids(model, tokenizer)
    processor = LlavaProcessor(
        image_processor=build_image_processor(),
        **_processor_kwargs(tokenizer),
    )
    return _save(out_dir, model, processor)


def build_tiny_sp(out_dir: str | os.PathLike) -> Path:
    """``tiny-sp``: ``tiny`` with a Llama-style sentencepiece tokenizer (lone ``▁`` before digits, byte fallback)."""
    return build_tiny(out_dir, tokenizer_style="sentencepiece")


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def build_tiny_next(out_dir: str | os.PathLike) -> Path:
    """The ``tiny-next`` backbone: LLaVA-NeXT-shaped, AnyRes tiling over 32 px tiles, image newline."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = build_tokenizer()
    config = LlavaNextConfig(
        **_llava_config_kwargs(tokenizer),
        image_grid_pinpoints=NEXT_PINPOINTS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).float().eval()
    _generation_ids(model, tokenizer)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=NEXT_PINPOINTS,
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        **_processor_kwargs(tokenizer),
    )
    return _save(out_dir, model, processor)


def build_tiny_clip(out_dir: str | os.PathLike) -> Path:
    """``tiny-clip``: a stand-alone CLIP vision encoder with its image processor (to assemble a LLaVA)."""
    import torch
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    model = CLIPVisionModel(_vision_config()).float().eval()
    return _save(out_dir, model, build_image_processor())


def build_tiny_qwen2(out_dir: str | os.PathLike) -> Path:
    """``tiny-qwen2``: a stand-alone Qwen2 causal LM (128-d; bitsandbytes CPU inference needs widths divisible by 64) with a ChatML tokenizer (to assemble a LLaVA)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from lora_llava.data.chat import chat_format

    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = chat_format("chatml").jinja
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(_text_config(tokenizer, "qwen2", hidden=128)).float().eval()
    _generation_ids(model, tokenizer)
    return _save(out_dir, model, tokenizer)


@dataclass(frozen=True)
class Builtin:
    """A model lora_llava builds offline: a LLaVA backbone, or a part to assemble one from."""

    name: str
    build: Callable[[Path], Path]
    kind: str  # "backbone" | "part"
    description: str
    family: str = ""  # backbones: "llava" | "llava_next"
    chat_format: str = ""  # backbones: the format of the saved chat template
    recipe: str | None = None  # backbones: the built-in recipe that uses it


# the one table of built-in models: the registry's backbones and assemble's parts are read from it
BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            "tiny",
            build_tiny,
            "backbone",
            "LLaVA-1.5-shaped, random init, built offline (CLIP 32px + MLP + LLaMA 64-d); for CPU runs and tests",
            family="llava",
            chat_format="vicuna_v1",
            recipe="quickstart",
        ),
        Builtin(
            "tiny-sp",
            build_tiny_sp,
            "backbone",
            "tiny with a Llama-style sentencepiece tokenizer (lone \u2581 before digits, byte fallback)",
            family="llava",
            chat_format="vicuna_v1",
            recipe="tiny-sp/qlora",
        ),
        Builtin(
            "tiny-next",
            build_tiny_next,
            "backbone",
            "LLaVA-NeXT-shaped, random init, built offline (AnyRes over 32px tiles, image newline)",
            family="llava_next",
            chat_format="vicuna_v1",
            recipe="tiny-next/qlora",
        ),
        Builtin("tiny-clip", build_tiny_clip, "part", "CLIP vision encoder (32px, 8px patches) to assemble a LLaVA"),
        Builtin("tiny-qwen2", build_tiny_qwen2, "part", "Qwen2 causal LM (128-d) with a ChatML tokenizer"),
    ]
}


def ensure_tiny(name: str = "tiny") -> Path:
    """Return the directory of a built-in offline backbone, building it (atomically) on first use."""
    target = cache_root() / f"{name}-v{TINY_VERSION}"
    if (target / MODEL_CONFIG_FILE).is_file() and (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        BUILTINS[name].build(tmp)
        (tmp / ".complete").write_text(json.dumps({"name": name, "version": TINY_VERSION, "sha": _digest(tmp)}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
