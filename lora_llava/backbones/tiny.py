"""Built-in offline backbones: a LLaVA-1.5-shaped model small enough for a laptop CPU.

Usage::

    from lora_llava.backbones.tiny import ensure_tiny
    path = ensure_tiny()            # builds once into the cache, then reuses it
    LlavaForConditionalGeneration.from_pretrained(path)

Everything is made locally and deterministically: a byte-level BPE tokenizer trained on a fixed
corpus (with ``<image>``, ``<s>``, ``</s>``, ``<pad>`` as special tokens and a BOS post-processor, as
LLaMA tokenizers have), a CLIP image processor, and a random-init ``LlavaForConditionalGeneration``
(CLIP vision tower, 2-layer GELU MLP projector, LLaMA language model) from a fixed seed. Building it
twice gives bit-identical weights, so a run directory that names ``tiny`` is reproducible anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "1"
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


def build_tokenizer():
    """A LLaMA-like fast tokenizer (byte-level BPE, BOS added) trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
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


def build_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )


def build_tiny(out_dir: str | os.PathLike) -> Path:
    """Write the ``tiny`` backbone (model, tokenizer, processor, chat template) to ``out_dir``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from lora_llava.data.chat import chat_format

    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,  # logits sharp enough for a frozen random LM head to be steered
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_format("vicuna_v1").jinja,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def cache_root() -> Path:
    base = os.environ.get("LORA_LLAVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora_llava"
    )
    return Path(base)


def ensure_tiny(name: str = "tiny") -> Path:
    """Return the directory of a built-in offline backbone, building it (atomically) on first use."""
    builders = {"tiny": build_tiny}
    target = cache_root() / f"{name}-v{TINY_VERSION}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        builders[name](tmp)
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
