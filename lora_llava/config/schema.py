"""The recipe schema: every key a recipe may hold, its type, default, bounds and help text.

Usage::

    from lora_llava.config import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"])
    recipe.train.learning_rate

Field metadata understood by the loader:
``help`` (shown by ``lora-llava recipes --keys``), ``min`` / ``max`` (inclusive bounds)
and ``required`` (no default; the key must be present).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DType = Literal["bfloat16", "float16", "float32"]


def _f(default, help: str, **meta):
    """A dataclass field carrying its help text and bounds."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _req(help: str, **meta):
    return field(metadata={"help": help, "required": True, **meta})


@dataclass
class DataSource:
    path: str = _req("LLaVA-Instruct JSON file: a list of {id, image, conversations: [{from, value}]}.")
    image_folder: str | None = _f(None, "Folder the samples' `image` paths are relative to.")
    max_samples: int | None = _f(None, "Use at most this many samples of this source (first N).", min=1)


@dataclass
class DataConfig:
    train: list[DataSource] = _req("Training mixture: one or more sources.", min_items=1)
    eval: list[DataSource] = _f(list, "Evaluation sources (exact-match accuracy after training).")
    max_length: int = _f(2048, "Longest sample in tokens, counted after image-token expansion.", min=8)
    on_bad_sample: Literal["error", "skip"] = _f(
        "error",
        "error: list every bad sample and stop before any model work; "
        "skip: leave them out and write them to <output_dir>/rejected.jsonl.",
    )
    max_bad_fraction: float = _f(
        0.05, "With on_bad_sample=skip, stop when more than this share is bad.", min=0.0, max=1.0
    )


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = _f(True, "QLoRA: load the language model in 4-bit. false = 16-bit LoRA.")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "bitsandbytes 4-bit data type.")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: DType = _f("bfloat16", "dtype of the unquantized parts and of 4-bit matmuls.")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.", min=1)
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).", min=1)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", min=0.0, max=1.0)
    target_modules: list[str] = _f(
        lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layer names inside the language model; matched only under the language model's path.",
        min_items=1,
    )


@dataclass
class ProjectorConfig:
    policy: Literal["full", "frozen"] = _f("full", "full: train every projector weight; frozen: keep it.")
    learning_rate: float | None = _f(None, "Projector learning rate (default: train.learning_rate).", min=0.0)


@dataclass
class VisionTowerConfig:
    policy: Literal["frozen", "lora", "full"] = _f(
        "frozen", "frozen (LLaVA's choice), lora (LoRA on its attention/MLP), or full (every weight trains)."
    )
    learning_rate: float | None = _f(None, "Vision tower learning rate (default: train.learning_rate).", min=0.0)
    target_modules: list[str] = _f(
        lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "policy lora: linear layer names inside the vision tower.",
        min_items=1,
    )


@dataclass
class LanguageModelConfig:
    policy: Literal["lora", "frozen"] | None = _f(
        None, "lora or frozen; default: lora for stage instruct, frozen for stage align."
    )


@dataclass
class ImagesConfig:
    max_tiles: int | None = _f(
        None,
        "LLaVA-NeXT: keep only AnyRes grids of at most this many tiles (caps image tokens per image).",
        min=1,
    )


@dataclass
class AssembleConfig:
    vision_encoder: str = _req("CLIP or SigLIP vision model: built-in part (tiny-clip), Hub id or directory.")
    language_model: str = _req(
        "Causal LM (Llama, Mistral, Qwen2, Phi, ...): built-in part (tiny-qwen2), Hub id or directory."
    )
    projector: Literal["mlp2x_gelu", "linear"] = _f(
        "mlp2x_gelu", "LLaVA-1.5's 2-layer GELU MLP, or LLaVA's linear map."
    )
    vision_feature_layer: int = _f(-2, "Hidden layer of the vision encoder whose features are projected.")
    vision_feature_select: Literal["default", "full"] = _f(
        "default", "default: drop the CLS token (CLIP); full: keep every token (SigLIP has no CLS)."
    )
    chat_format: Literal["vicuna_v1", "mistral_instruct", "chatml", "llama3"] | None = _f(
        None, "Chat format; default: inferred from the language model's tokenizer."
    )
    seed: int = _f(0, "Seed of the projector's initialization.")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "Passes over the training mixture (ignored when max_steps is set).", min=0.0)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.", min=1)
    batch_size: int = _f(4, "Samples per device step.", min=1)
    grad_accum: int = _f(4, "Device steps per optimizer step.", min=1)
    learning_rate: float = _f(2e-4, "Learning rate of the LoRA weights.", min=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f("cosine", "Schedule.")
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up.", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", min=0.0)
    seed: int = _f(42, "Seed for initialization, shuffling and dropout.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward pass to save memory.")
    logging_steps: int = _f(10, "Log loss every N optimizer steps.", min=1)
    save_steps: int | None = _f(None, "Write a resumable checkpoint every N optimizer steps.", min=1)
    dataloader_workers: int = _f(0, "Worker processes preparing batches.", min=0)
    report_to: Literal["none", "wandb"] = _f("none", "Where metrics go besides the console and metrics.jsonl.")
    wandb_project: str | None = _f(
        None, "wandb project (report_to: wandb). WANDB_MODE=offline works without an account."
    )


@dataclass
class EvalConfig:
    max_new_tokens: int = _f(16, "Longest generated answer.", min=1)
    batch_size: int = _f(8, "Samples generated together.", min=1)
    max_samples: int | None = _f(None, "Score at most this many samples.", min=1)


@dataclass
class MergeConfig:
    dtype: Literal["bfloat16", "float16", "float32"] = _f("bfloat16", "dtype of the merged weights.")
    base: Literal["dequantized", "original"] = _f(
        "dequantized",
        "QLoRA runs: fold LoRA into the NF4 base as trained, dequantized to 16-bit (matches the adapter), "
        "or into the original 16-bit weights (differs by the quantization error).",
    )
    verify_samples: int = _f(4, "Samples used to check merged-vs-adapter parity.", min=1)


@dataclass
class Recipe:
    backbone: str = _req(
        "A registered backbone name (lora-llava recipes --backbones), a Hub id, a local directory, a stage-1 "
        "run directory, or `assemble` (build a new LLaVA from the assemble section)."
    )
    data: DataConfig = _req("Training and evaluation data.")
    output_dir: str = _req("Run directory: adapter, metrics and the resolved recipe are written here.")
    stage: Literal["align", "instruct"] = _f(
        "instruct", "align: stage 1, only the projector trains; instruct: stage 2, projector + LoRA on the LLM."
    )
    assemble: AssembleConfig | None = _f(None, "With backbone: assemble, the parts of the new LLaVA.")
    quantization: QuantizationConfig = _f(QuantizationConfig, "How the language model is loaded.")
    lora: LoraConfig = _f(LoraConfig, "LoRA adapters on the language model.")
    projector: ProjectorConfig = _f(ProjectorConfig, "The vision-to-language projector.")
    vision_tower: VisionTowerConfig = _f(VisionTowerConfig, "The vision encoder.")
    language_model: LanguageModelConfig = _f(LanguageModelConfig, "The language model.")
    images: ImagesConfig = _f(ImagesConfig, "Image handling.")
    train: TrainConfig = _f(TrainConfig, "Optimization.")
    eval: EvalConfig = _f(EvalConfig, "Generation-based evaluation.")
    merge: MergeConfig = _f(MergeConfig, "Folding the adapter into deployable weights.")
