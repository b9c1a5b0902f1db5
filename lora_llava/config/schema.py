"""The recipe schema: every key a recipe may hold, its type, default, bounds and help text.

Usage::

    from lora_llava.config import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"])
    recipe.train.learning_rate

Fields are declared with ``option(default, help, min=..., max=...)`` or ``required(help)`` (also used by
other strict schemas, such as ``lora-llava data generate``'s). Field metadata understood by the loader:
``help`` (shown by ``lora-llava recipes --keys``), ``min`` / ``max`` (inclusive bounds)
and ``required`` (no default; the key must be present).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lora_llava.errors import UserError

# the chat formats by name (lora_llava.data.chat defines them); plain: stage-1 alignment only
ConversationFormatName = Literal["vicuna_v1", "mistral_instruct", "chatml_direct", "chatml", "llama3"]
ChatFormatName = Literal[ConversationFormatName, "plain"]


DType = Literal["bfloat16", "float16", "float32"]  # the one list of dtypes a recipe or a flag may name
DTYPE_NAMES: tuple[str, ...] = get_args(DType)
MergeBase = Literal["dequantized", "original"]
MERGE_BASES: tuple[str, ...] = get_args(MergeBase)


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
MAX_LENGTH_MAX = 262_144  # tokens of one sample (or one packed row): far past any LLaVA context, short of a memory bomb
INT_MAX = 2**31 - 1  # any other count: what a signed 32-bit index holds
FLOAT_MAX = 1e9  # any other number: finite, and far past every rate, ratio and norm a recipe means


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its help text and bounds."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def required(help: str, **meta: Any) -> Any:
    """A dataclass field with no default: the key must be present."""
    return field(metadata={"help": help, "required": True, **meta})


@dataclass
class Columns:
    id: str | None = option(None, "Field holding the sample id (default: id; without one, the sample's position).")
    conversations: str | None = option(
        None, "Field holding the list of turns (default: conversations; messages for format messages)."
    )
    image: str | None = option(
        None, "Field holding the image or list of images (default: image; images for format messages)."
    )
    role: str | None = option(None, "Key in each turn naming the speaker (default: from, else role).")
    text: str | None = option(None, "Key in each turn holding its text (default: value, else content).")


@dataclass
class RoleNames:
    user: list[str] = option(list, "More speaker names read as the user (built in: human, user).")
    assistant: list[str] = option(list, "More speaker names read as the assistant (built in: gpt, assistant).")
    system: list[str] = option(list, "More speaker names read as the system prompt (built in: system).")


@dataclass
class DataSource:
    path: str = required("Data: a JSON or JSONL file, a parquet file, or a folder written by datasets' save_to_disk.")
    format: Literal["auto", "llava", "sharegpt", "messages"] = option(
        "auto",
        "llava: {id, image, conversations: [{from, value}]}; sharegpt: the same, text-only; messages: "
        "TRL/OpenAI {messages: [{role, content}], images}; auto: messages if records have `messages`, else llava.",
    )
    image_folder: str | None = option(None, "Folder the samples' image paths are relative to.")
    image_roots: list[str] = option(
        list,
        "More folders an image path's symlinks may point into (image paths stay relative to image_folder): "
        "a Hugging Face Hub cache's repo folder for snapshots/<rev>/x.png -> ../../blobs/<hash>, a DVC or "
        "git-annex cache. A link to anywhere else is refused.",
    )
    split: str | None = option(None, "Split of a saved DatasetDict folder (default: train, or its only split).")
    columns: Columns = option(Columns, "Other field names, mapped without code: columns: {conversations: dialog, ...}.")
    roles: RoleNames = option(RoleNames, "Other speaker names, mapped without code: roles: {user: [customer]}.")
    max_samples: int | None = option(
        None, "Use at most this many samples of this source, drawn at random (seeded by data.seed).", min=1
    )
    fraction: float | None = option(
        None, "Use this share of the source's samples, drawn at random (seeded by data.seed).", min=0.0, max=1.0
    )
    repeats: int = option(
        1, "Each used sample appears this many times per epoch (upsampling a small source).", min=1, max=1000
    )
    prompt_style: Literal["plain", "short_answer", "multiple_choice"] = option(
        "plain",
        "plain: questions as written; short_answer: LLaVA-1.5's VQA prompt, every human turn gets "
        "'\\nAnswer the question using a single word or phrase.'; multiple_choice: "
        "'\\nAnswer with the option's letter from the given choices directly.'",
    )


@dataclass
class DataConfig:
    train: list[DataSource] = required("Training mixture: one or more sources.", min_items=1)
    eval: list[DataSource] = option(list, "Evaluation sources (exact-match accuracy after training).")
    eval_split: int | float | None = option(
        None,
        "Carve an eval set out of the training mixture: a fraction (0.05) or a number of samples (200); "
        "seeded, no sample in both.",
    )
    seed: int | None = option(
        None,
        "Seed of source sampling (fraction, max_samples) and eval_split (default: train.seed).",
        min=0,
        max=SEED_MAX,
    )
    max_length: int = option(
        2048, "Longest sample in tokens, counted after image-token expansion.", min=8, max=MAX_LENGTH_MAX
    )
    overlength: Literal["bad_sample", "drop", "truncate_turns"] = option(
        "bad_sample",
        "A sample over max_length: bad_sample (on_bad_sample decides), drop (leave it out, listed in "
        "rejected.jsonl), truncate_turns (drop whole later exchanges; never inside image tokens; dropped if the "
        "first exchange alone is too long).",
    )
    on_bad_sample: Literal["error", "skip"] = option(
        "error",
        "error: list every bad sample and stop before any model work; "
        "skip: leave them out and write them to <output_dir>/rejected.jsonl.",
    )
    max_bad_fraction: float = option(
        0.05, "With on_bad_sample=skip, stop when more than this share is bad.", min=0.0, max=1.0
    )


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = option(True, "QLoRA: load the language model in 4-bit. false = 16-bit LoRA.")
    quant_type: Literal["nf4", "fp4"] = option("nf4", "bitsandbytes 4-bit data type.")
    double_quant: bool = option(True, "Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: DType = option("bfloat16", "dtype of the unquantized parts and of 4-bit matmuls.")


@dataclass
class LoraConfig:
    r: int = option(16, "LoRA rank.", min=1, max=4096)
    alpha: int = option(32, "LoRA scaling numerator (scale = alpha / r).", min=1, max=65536)
    dropout: float = option(0.05, "Dropout on the LoRA input.", min=0.0, max=1.0)
    target_modules: list[str] = option(
        lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layer names inside the language model; matched only under the language model's path.",
        min_items=1,
    )


@dataclass
class ProjectorConfig:
    policy: Literal["full", "frozen"] = option("full", "full: train every projector weight; frozen: keep it.")
    learning_rate: float | None = option(None, "Projector learning rate (default: train.learning_rate).", min=0.0)


@dataclass
class VisionTowerConfig:
    policy: Literal["frozen", "lora", "full"] = option(
        "frozen", "frozen (LLaVA's choice), lora (LoRA on its attention/MLP), or full (every weight trains)."
    )
    learning_rate: float | None = option(None, "Vision tower learning rate (default: train.learning_rate).", min=0.0)
    target_modules: list[str] = option(
        lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "policy lora: linear layer names inside the vision tower.",
        min_items=1,
    )


@dataclass
class LanguageModelConfig:
    policy: Literal["lora", "frozen"] | None = option(
        None, "lora or frozen; default: lora for stage instruct, frozen for stage align."
    )


@dataclass
class ImagesConfig:
    max_tiles: int | None = option(
        None,
        "LLaVA-NeXT: keep only AnyRes grids of at most this many tiles (caps image tokens per image).",
        min=1,
    )
    pad_to_square: bool = option(
        False,
        "LLaVA-1.5's `pad` handling: center each image on a square of the processor's mean color before "
        "processing (instead of the center crop). Applied in training, eval and merge checks alike.",
    )


@dataclass
class AssembleConfig:
    vision_encoder: str = required("CLIP or SigLIP vision model: built-in part (tiny-clip), Hub id or directory.")
    language_model: str = required(
        "Causal LM (Llama, Mistral, Qwen2, Phi, ...): built-in part (tiny-qwen2), Hub id or directory."
    )
    projector: Literal["mlp2x_gelu", "linear"] = option(
        "mlp2x_gelu", "LLaVA-1.5's 2-layer GELU MLP, or LLaVA's linear map."
    )
    vision_feature_layer: int = option(
        -2, "Hidden layer of the vision encoder whose features are projected.", min=-256, max=256
    )
    vision_feature_select: Literal["default", "full"] = option(
        "default", "default: drop the CLS token (CLIP); full: keep every token (SigLIP has no CLS)."
    )
    chat_format: ConversationFormatName | None = option(
        None,
        "Chat format recorded with the assembled model (stage 2 trains in it); default: inferred from the "
        "language model's tokenizer.",
    )
    seed: int = option(0, "Seed of the projector's initialization.", min=0, max=SEED_MAX)


@dataclass
class ChatConfig:
    format: ChatFormatName | None = option(
        None,
        "How conversations are rendered. Default: the backbone's own format for stage instruct (what its "
        "checkpoints were trained with), plain for stage align (LLaVA-1.5's: image + caption + newline, no "
        "instruction). Naming a conversation format for stage align trains it chat-style (LLaVA-1.0's way): "
        "captions answer a brief-description instruction.",
    )
    system_prompt: str | None = option(
        None,
        "System prompt rendered before every conversation that has none of its own. Default: the format's "
        "(vicuna_v1: Vicuna's 'A chat between a curious user ...'; chatml_direct: 'Answer the questions.'; "
        "others none); '' renders none (on the command line: chat.system_prompt=\"''\"). Saved in the chat "
        "template, so inference prompts match training.",
    )


@dataclass
class TrainConfig:
    epochs: float = option(1.0, "Passes over the training mixture (ignored when max_steps is set).", min=0.0)
    max_steps: int | None = option(None, "Stop after this many optimizer steps.", min=1)
    batch_size: int = option(4, "Samples per device step.", min=1, max=65536)
    grad_accum: int = option(4, "Device steps per optimizer step.", min=1, max=65536)
    global_batch_size: int | None = option(
        None,
        "Samples per optimizer step over every process (batch_size x grad_accum x processes). Set, it decides "
        "grad_accum for the number of processes the run starts with (train.grad_accum is then not used), so the "
        "same recipe trains with the same batches and schedule on 1 or 8 GPUs; it must be a multiple of "
        "batch_size x processes.",
        min=1,
        max=2**31 - 1,
    )
    learning_rate: float = option(2e-4, "Learning rate of the LoRA weights.", min=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine", "Schedule.")
    warmup_ratio: float = option(0.03, "Share of steps spent warming up.", min=0.0, max=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm.", min=0.0)
    seed: int = option(42, "Seed for initialization, shuffling and dropout.", min=0, max=SEED_MAX)
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass to save memory.")
    logging_steps: int = option(10, "Log loss every N optimizer steps.", min=1)
    save_steps: int | None = option(
        None, "Write a resumable checkpoint (whole or absent) to <output_dir>/checkpoints every N steps.", min=1
    )
    keep_checkpoints: int | None = option(
        None,
        "Keep only the newest N checkpoints (plus the best by eval accuracy, with train.eval_steps); older ones "
        "are deleted once a newer one is complete. Default: keep all.",
        min=1,
    )
    resume: bool = option(
        False,
        "Continue from the newest complete checkpoint in <output_dir>/checkpoints whose files verify against its "
        "manifest (a damaged one is skipped, and said so).",
    )
    eval_steps: int | None = option(
        None,
        "Every N optimizer steps, and at the end: eval loss and exact-match accuracy on the eval data (data.eval, "
        "data.eval_split; at most eval.max_samples), the answers in <output_dir>/eval/step-N.jsonl.",
        min=1,
    )
    max_bad_steps: int = option(
        5,
        "A step whose loss or gradient norm is NaN/inf is skipped (no weight or optimizer update); this many in a "
        "row stop the run with an error naming the samples of the offending batch.",
        min=1,
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = option(
        "adamw",
        "adamw: torch AdamW, fp32 moments. adamw_8bit: bitsandbytes' 8-bit AdamW (a quarter of the optimizer state). "
        "paged_adamw_8bit: the same in paged memory CUDA moves to the CPU under memory pressure (on a CPU: adamw_8bit).",
    )
    packing: bool = option(
        False,
        "Pack several samples into each row of up to data.max_length tokens (best-fit), positions restarted per "
        "sample and attention kept within each sample: no padding. train.batch_size then counts rows.",
    )
    supervised_logits: bool = option(
        True,
        "Compute the LM head and the loss only at positions whose next token is labelled (answers), not over the "
        "image tokens and prompts: the same loss, a fraction of the logits' memory. false: the model's own forward.",
    )
    dataloader_workers: int = option(0, "Worker processes preparing batches.", min=0, max=256)
    group_by_length: bool = option(
        True,
        "Batch samples of similar length together, image and text-only samples apart (LLaVA's modality-length "
        "grouping, seeded); cuts padding.",
    )
    report_to: Literal["none", "wandb"] = option("none", "Where metrics go besides the console and metrics.jsonl.")
    wandb_project: str | None = option(
        None, "wandb project (report_to: wandb). WANDB_MODE=offline works without an account."
    )

    def accumulation(self, processes: int = 1) -> int:
        """Micro-batches per optimizer step on each process: ``grad_accum``, or what ``global_batch_size`` makes of
        it for ``processes`` (a UserError when it does not divide evenly)."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_step = self.batch_size * processes
        if self.global_batch_size % per_step:
            fits = [n for n in range(1, 65) if self.global_batch_size % (self.batch_size * n) == 0][:6]
            near = per_step * max(1, round(self.global_batch_size / per_step))
            raise UserError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.batch_size="
                f"{self.batch_size} x {processes} process(es) = {per_step}",
                hint=f"choose a multiple of {per_step} (e.g. train.global_batch_size={near})"
                + (f", or run with {', '.join(map(str, fits))} process(es)" if fits else ""),
            )
        return self.global_batch_size // per_step

    def batch_line(self, processes: int = 1) -> str:
        """The optimizer step's batch in one line (what the learning-rate schedule counts)."""
        b, accum = self.batch_size, self.accumulation(processes)
        rows = "rows" if self.packing else "samples"
        per = f"batch: {b} per process x {accum} accumulation x {processes} process{'es' if processes > 1 else ''}"
        return f"{per} = {b * accum * processes} {rows} per optimizer step"


@dataclass
class EvalConfig:
    max_new_tokens: int = option(
        16,
        "Longest generated answer (scoring raises it to fit a reference answer of up to 64 tokens, and says so).",
        min=1,
        max=MAX_LENGTH_MAX,
    )
    batch_size: int = option(8, "Samples generated together.", min=1)
    max_samples: int | None = option(None, "Score at most this many samples.", min=1)


@dataclass
class MergeConfig:
    dtype: DType = option("bfloat16", "dtype of the merged weights.")
    base: MergeBase = option(
        "dequantized",
        "QLoRA runs: fold LoRA into the NF4 base as trained, dequantized to 16-bit (matches the adapter), "
        "or into the original 16-bit weights (differs by the quantization error).",
    )
    verify_samples: int = option(4, "Samples used to check merged-vs-adapter parity.", min=1)
    verify_quantized: bool = option(
        True, "Also check the merged model re-quantized to 4-bit NF4 (how it is often served on small GPUs)."
    )
    min_agreement: float | None = option(
        None,
        "Greedy answers of the merged model (as stored) that must equal the adapter's, as a share; below it the "
        "merge exits with an error and the output is kept but marked unverified.",
        min=0.0,
        max=1.0,
    )
    max_shard_size: str = option(
        "5GB", "Largest safetensors shard of the merged checkpoint (transformers' max_shard_size)."
    )


@dataclass
class Recipe:
    backbone: str = required(
        "A registered backbone name (lora-llava recipes --backbones), a Hub id, a local directory, a stage-1 "
        "run directory, or `assemble` (build a new LLaVA from the assemble section)."
    )
    data: DataConfig = required("Training and evaluation data.")
    output_dir: str = required("Run directory: adapter, metrics and the resolved recipe are written here.")
    stage: Literal["align", "instruct"] = option(
        "instruct", "align: stage 1, only the projector trains; instruct: stage 2, projector + LoRA on the LLM."
    )
    assemble: AssembleConfig | None = option(None, "With backbone: assemble, the parts of the new LLaVA.")
    quantization: QuantizationConfig = option(QuantizationConfig, "How the language model is loaded.")
    lora: LoraConfig = option(LoraConfig, "LoRA adapters on the language model.")
    projector: ProjectorConfig = option(ProjectorConfig, "The vision-to-language projector.")
    vision_tower: VisionTowerConfig = option(VisionTowerConfig, "The vision encoder.")
    language_model: LanguageModelConfig = option(LanguageModelConfig, "The language model.")
    images: ImagesConfig = option(ImagesConfig, "Image handling.")
    chat: ChatConfig = option(ChatConfig, "Chat format and system prompt.")
    train: TrainConfig = option(TrainConfig, "Optimization.")
    eval: EvalConfig = option(EvalConfig, "Generation-based evaluation.")
    merge: MergeConfig = option(MergeConfig, "Folding the adapter into deployable weights.")

    @property
    def lm_policy(self) -> str:
        """The language model's policy: language_model.policy, else frozen for stage align, lora for instruct."""
        if self.language_model.policy is not None:
            return self.language_model.policy
        return "frozen" if self.stage == "align" else "lora"

    def chat_format_for(self, backbone_format: str) -> str:
        """The chat format a run trains in: chat.format, else plain for stage align, else the backbone's."""
        if self.chat.format:
            return self.chat.format
        return "plain" if self.stage == "align" else backbone_format
