"""Training speed on CPU, side by side: lora_llava's trainer, a hand-written loop (the floor), TRL's SFTTrainer.

Usage::

    python bench/train_speed.py                        # the table in bench/README.md (about 5 minutes on 2 cores)
    python bench/train_speed.py --repeats 3 --steps 8  # more samples of the step time
    python bench/train_speed.py --profile              # also: where one step's time goes (torch.profiler)

One LLaVA-1.5-shaped random-init model, built locally: a CLIP tower at 336 px with 14 px patches (576 image
tokens per image), the 2-layer GELU projector, a LLaMA language model with a 32,000-token vocabulary
(``--hidden``, ``--layers``), saved as a checkpoint directory with the tiny backbone's tokenizer; QLoRA as
lora_llava trains it (NF4 language model, LoRA r=16 on every LM linear, projector trained in float32, vision
tower frozen, float32 compute on the CPU). The data: synthetic shapes images, one question each, answers of
1 to 60 words (mixed lengths). Every runner gets the same model directory, samples, batch size, learning rate,
LoRA and projector settings, gradient checkpointing off, and the same batches in the same order (lora_llava's
length-grouped order; TRL reads the dataset in that order with its sequential sampler):

- ``lora_llava``: ``lora_llava.train(recipe)``, the public path (data check, model load, part policy, Trainer);
- ``hand loop``: the same model built with lora_llava's loader, the batches collated beforehand, then
  forward, backward, ``AdamW.step``, ``zero_grad`` (nothing else: the floor);
- ``TRL``: ``SFTTrainer`` as its VLM docs show (model path + ``quantization_config`` + ``peft_config``,
  a conversational prompt-completion dataset with ``images``, ``SFTConfig(max_length=None)``), the projector
  trained through ``modules_to_save``.

Each runner runs in a fresh process (pinned to ``--threads`` torch threads), ``--warmup`` steps then ``--steps``
timed steps; the runners are interleaved ``--repeats`` times. Step time is the time between consecutive
optimizer steps (a global ``torch.optim`` step hook: the same clock for all three); reported as the median
over every timed step with its interquartile range. Startup is from the command that starts the process
to the end of the first optimizer step. Peak RSS is the process's ``ru_maxrss``.

The memory table (exact tensor bytes, lora_llava's model and first batch): weights and optimizer state are
summed over the tensors themselves (4-bit weights with their quantization constants); activations and
logits are the tensors autograd saves for the backward, captured with ``torch.autograd.graph.saved_tensors_hooks``
(each storage once; logits are the tensors whose last dimension is the vocabulary), plus the logits tensor
the forward returns. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# lora_llava as shipped (logits only at supervised positions), the same with the model's own full forward
# (train.supervised_logits=false), with train.packing=true, then the hand loop and TRL
RUNNERS = ("lora_llava", "lora_llava full logits", "lora_llava packed", "hand loop", "TRL")
VARIANTS = {
    "lora_llava": {},
    "lora_llava full logits": {"supervised_logits": False},
    "lora_llava packed": {"packing": True},
}
WORDS = "red green blue yellow circle square small large shape color image the a of left right top".split()


# ------------------------------------------------------------------------------------------- setup


def build(root: Path, hidden: int, layers: int, samples: int) -> None:
    """The model directory (root/model) and the data (root/data/train.json + images)."""
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lora_llava.backbones.tiny import ensure_tiny
    from lora_llava.data.chat import chat_format
    from lora_llava.model.loading import load_processor

    tokenizer = load_processor(ensure_tiny("tiny")).tokenizer
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=128)  # fmt: skip
    text = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 16 * 16,
                       num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                       num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=False,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).float()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_format("vicuna_v1").jinja,
    )  # fmt: skip
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    rng = random.Random(0)
    records = []
    for i in range(samples):
        color = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (64, 64), color).save(images / f"{i}.png")
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))).capitalize() + "."
        conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": conv})
    (root / "data" / "train.json").write_text(json.dumps(records))


def recipe_for(root: Path, args: argparse.Namespace, output: str, **train: Any) -> Any:
    from lora_llava.config.load import load_recipe

    return load_recipe({
        "backbone": str(root / "model"),
        "output_dir": str(root / "runs" / output),
        "data": {"train": [{"path": str(root / "data" / "train.json"), "image_folder": str(root / "data" / "images")}],
                 "max_length": 1024},
        "quantization": {"load_in_4bit": True, "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "projector": {"policy": "full", "learning_rate": 2e-4},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "grad_accum": 1,
                  "learning_rate": 2e-4, "warmup_ratio": 0.0, "lr_scheduler": "constant", "weight_decay": 0.0,
                  "gradient_checkpointing": False, "logging_steps": args.warmup + args.steps,
                  "group_by_length": True, "seed": 42, **train},
    })  # fmt: skip


def batch_order(root: Path, args: argparse.Namespace) -> list[list[int]]:
    """The batches (sample indices) lora_llava's length-grouped sampler draws: every runner trains on these."""
    from lora_llava.data.sampler import ModalityLengthGroupedSampler
    from lora_llava.training.prepare import prepare_run

    prepared = prepare_run(recipe_for(root, args, "order"), None, log=lambda *a: None)
    rep = prepared.report
    lengths = [rep.length_of(s) for s in rep.train]
    order = list(ModalityLengthGroupedSampler(lengths, [bool(s.images) for s in rep.train], args.batch, 42))
    ids = [int(s.id) for s in rep.train]
    batches = [[ids[i] for i in order[k : k + args.batch]] for k in range(0, len(order), args.batch)]
    pad = sum(args.batch * max(lengths[i] for i in order[k : k + args.batch]) for k in range(0, len(order), args.batch))
    rnd = random.Random(42).sample(range(len(lengths)), len(lengths))
    pad_random = sum(
        args.batch * max(lengths[i] for i in rnd[k : k + args.batch]) for k in range(0, len(rnd), args.batch)
    )
    (root / "padding.json").write_text(json.dumps({
        "grouped": 1 - sum(lengths) / pad, "random": 1 - sum(lengths) / pad_random,
        "min": min(lengths), "max": max(lengths), "median": statistics.median(lengths)}))  # fmt: skip
    return batches


# ------------------------------------------------------------------------------------------ the runners


class StepClock:
    """Wall-clock time of every optimizer step's end (a global torch.optim hook: same clock for every runner)."""

    def __init__(self, profile_steps: tuple[int, int] | None = None) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.ends: list[float] = []
        self.prof: Any = None
        if profile_steps:
            from torch.profiler import ProfilerActivity, profile, schedule

            first, count = profile_steps
            self.prof = profile(activities=[ProfilerActivity.CPU],
                                schedule=schedule(wait=first - 1, warmup=0, active=count, repeat=1))  # fmt: skip
            self.prof.start()
        register_optimizer_step_post_hook(self.hook)

    def hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if getattr(optimizer, "skip_clock", False):
            return
        self.ends.append(time.time())
        if self.prof is not None:
            self.prof.step()


def run_lora_llava(root: Path, args: argparse.Namespace, clock: StepClock, variant: str = "lora_llava") -> dict:
    import lora_llava

    recipe = recipe_for(root, args, variant.replace(" ", "_"), **VARIANTS[variant])
    result = lora_llava.train(recipe, log=lambda *a: None, overwrite=True)
    rows = [json.loads(ln) for ln in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    out: dict[str, Any] = {"first_loss": first["loss"], "padding": result.padding_fraction}
    if recipe.train.packing:  # rows hold several samples: count what a step trains on
        from lora_llava.data.packing import pack_indices
        from lora_llava.training.prepare import prepare_run

        report = prepare_run(recipe, None, log=lambda *a: None).report
        lengths = [report.length_of(s) for s in report.train]
        rows_n = len(pack_indices(lengths, recipe.data.max_length))
        out["per_step"] = {"samples": args.batch * len(lengths) / rows_n, "tokens": args.batch * sum(lengths) / rows_n}
    return out


def _model_and_batches(root: Path, args: argparse.Namespace, order: list[list[int]]) -> tuple[Any, Any, list[dict]]:
    from transformers import set_seed

    from lora_llava.data.batching import Collator
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters
    from lora_llava.training.prepare import prepare_run

    recipe = recipe_for(root, args, "hand")
    prepared = prepare_run(recipe, None, log=lambda *a: None)
    by_id = {int(s.id): s for s in prepared.report.train}
    collate = Collator(prepared.processor.tokenizer.pad_token_id)
    steps = args.warmup + args.steps
    batches = [collate(prepared.encoder.encode_batch([by_id[i] for i in b])) for b in order[:steps]]
    set_seed(recipe.train.seed)
    model, _ = load_base(prepared.spec, recipe.quantization)
    model = attach_adapters(model, prepared.spec, recipe)
    return model, prepared, batches


def run_hand(root: Path, args: argparse.Namespace, order: list[list[int]], clock: StepClock) -> dict:
    import torch

    model, _, batches = _model_and_batches(root, args, order)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    tokens = [(int(b["attention_mask"].sum()), int((b["labels"] != -100).sum())) for b in batches]
    return {"first_loss": losses[0], "tokens": tokens}


def run_trl(root: Path, args: argparse.Namespace, order: list[list[int]], clock: StepClock) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lora_llava.artifacts import resolve_backbone

    spec = resolve_backbone(str(root / "model"))
    records = {int(r["id"]): r for r in json.loads((root / "data" / "train.json").read_text())}
    rows = []
    for i in [i for b in order[: args.warmup + args.steps] for i in b]:
        conv = records[i]["conversations"]
        question = conv[0]["value"].replace("<image>\n", "")
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": conv[1]["value"]}]}],
            "images": [Image.open(root / "data" / "images" / records[i]["image"]).convert("RGB")],
        })  # fmt: skip
    config = SFTConfig(
        output_dir=str(root / "runs" / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, logging_steps=args.warmup + args.steps, logging_first_step=True, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=None, seed=42,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        model_init_kwargs={"dtype": "float32"},
    )  # fmt: skip
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype="float32",
                               llm_int8_skip_modules=spec.quantization_skip_modules())  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                      target_modules=spec.lora_target_regex(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]),
                      modules_to_save=["multi_modal_projector"])  # fmt: skip
    trainer = SFTTrainer(model=str(root / "model"), args=config, train_dataset=Dataset.from_list(rows),
                         quantization_config=quant, peft_config=lora)  # fmt: skip
    # TRL casts a quantized model's trainable weights to bfloat16 (its QLoRA recipe); back to float32, as the
    # other runners train them (the bfloat16 projector cannot even take the float32 CPU activations)
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    trainer.train()
    first = next(r for r in trainer.state.log_history if "loss" in r)
    return {"first_loss": first["loss"]}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    order = json.loads((root / "order.json").read_text())
    profile = (args.warmup + 1, 2) if args.profile_child else None
    clock = StepClock(profile)
    if args.child == "memory":
        out = memory_table(root, args, order)
    else:
        if args.child in VARIANTS:
            out = run_lora_llava(root, args, clock, args.child)
        else:
            out = {"hand loop": run_hand, "TRL": run_trl}[args.child](root, args, order, clock)
        out["ends"] = clock.ends
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if clock.prof is not None:
        clock.prof.stop()
        table = clock.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
        out["profile"] = table
    Path(args.out).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------- memory table


def memory_table(root: Path, args: argparse.Namespace, order: list[list[int]]) -> dict:
    import torch

    from lora_llava.model.trainability import get_module

    model, prepared, batches = _model_and_batches(root, args, order)
    model.train()
    spec = prepared.spec
    batch = batches[0]
    vocab = model.config.get_text_config().vocab_size
    proj = {id(p) for p in get_module(model, spec.projector).parameters()}
    weights = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    ptrs: dict[str, dict[int, int]] = {k: {} for k in ("4-bit weights", "16-bit weights", "LoRA", "projector")}
    for name, p in model.named_parameters():
        key = ("4-bit weights" if type(p).__name__ == "Params4bit" else "LoRA" if "lora_" in name
               else "projector" if id(p) in proj else "16-bit weights")  # fmt: skip
        ptrs[key][p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None), getattr(qs.state2, "code", None)):
                if isinstance(t, torch.Tensor):
                    ptrs[key][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for b in model.buffers():
        ptrs["16-bit weights"][b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    weight_ptrs = {p for d in ptrs.values() for p in d}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weight_ptrs and id(t) not in weights:
            saved[s.data_ptr()] = (s.nbytes(), t.dim() >= 2 and t.shape[-1] == vocab)
        return t

    from lora_llava.training.loss import supervised_loss

    # first lora_llava's loss (logits only at supervised positions), then the model's own full forward
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        supervised_loss(model, batch).backward()
    ours = dict(saved)
    model.zero_grad()
    saved.clear()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    logits_out = out.logits.untyped_storage()
    saved.setdefault(logits_out.data_ptr(), (logits_out.nbytes(), True))
    out.loss.backward()
    grads = {
        "LoRA": sum(p.grad.nbytes for n, p in model.named_parameters() if p.grad is not None and "lora_" in n),
        "projector": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None and id(p) in proj),
    }
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    rows = {k: sum(v.values()) for k, v in ptrs.items()}
    return {
        "rows": [
            ["4-bit weights (NF4 + quantization constants)", rows["4-bit weights"]],
            ["unquantized frozen weights (float32 on CPU; 16-bit on a GPU)", rows["16-bit weights"]],
            ["LoRA weights + gradients", rows["LoRA"] + grads["LoRA"]],
            ["projector weights + gradients", rows["projector"] + grads["projector"]],
            ["optimizer state (AdamW)", state],
            ["activations saved for backward", sum(n for n, lg in saved.values() if not lg)],
            ["logits, full forward (output + float32 log-softmax saved)", sum(n for n, lg in saved.values() if lg)],
        ],
        "supervised": [
            ["activations saved for backward", sum(n for n, lg in ours.values() if not lg)],
            ["logits, supervised positions only (lora_llava)", sum(n for n, lg in ours.values() if lg)],
        ],
        "batch": list(batch["input_ids"].shape),
        "vocab": vocab,
    }


# ---------------------------------------------------------------------------------------- the parent


def spawn(name: str, root: Path, args: argparse.Namespace, profile: bool = False) -> dict:
    out = root / f"result-{name.replace(' ', '_')}-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "--child", name, "--root", str(root), "--out", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--profile-child"] if profile else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
    t0 = time.time()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["t0"] = t0
    return result


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def versions() -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"trl {trl.__version__}, bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}")  # fmt: skip


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256, help="LM hidden size")
    ap.add_argument("--layers", type=int, default=4, help="LM decoder layers")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    ap.add_argument("--repeats", type=int, default=2, help="processes per runner, interleaved")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of every runner")
    ap.add_argument("--profile", action="store_true", help="also profile two steps of lora_llava and the hand loop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    command = "python bench/train_speed.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        os.environ["HF_HUB_OFFLINE"] = "1"
        build(root, args.hidden, args.layers, args.samples)
        order = batch_order(root, args)
        (root / "order.json").write_text(json.dumps(order))
        padding = json.loads((root / "padding.json").read_text())
        results: dict[str, list[dict]] = {r: [] for r in RUNNERS}
        for _ in range(args.repeats):
            for name in RUNNERS:
                results[name].append(spawn(name, root, args))
        memory = spawn("memory", root, args)
        profiles = (
            {n: spawn(n, root, args, profile=True)["profile"] for n in ("lora_llava", "hand loop")}
            if args.profile
            else {}
        )
    report(args, command, results, memory, padding, profiles)


def report(args: argparse.Namespace, command: str, results: dict, memory: dict, padding: dict, profiles: dict) -> None:
    tokens = results["hand loop"][0]["tokens"][args.warmup :]
    real = sum(t for t, _ in tokens) / len(tokens)
    supervised = sum(s for _, s in tokens) / len(tokens)
    print(f"$ {command}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch threads {args.threads}; {versions()}")
    print(f"model: LLaVA-1.5-shaped random init, CLIP 336 px / 14 px patches (576 image tokens), LLaMA {args.hidden}-d x "
          f"{args.layers} layers, vocabulary {memory['vocab']}; QLoRA NF4, LoRA r=16 on all LM linears, projector float32")  # fmt: skip
    print(f"data: {args.samples} samples of {padding['min']}-{padding['max']} tokens (median {padding['median']:.0f}); "
          f"batch {args.batch}; {real:.0f} real and {supervised:.0f} supervised tokens per step on average; "
          f"padding per epoch: grouped {padding['grouped']:.1%} (lora_llava), random batches {padding['random']:.1%}")  # fmt: skip
    print(f"{args.repeats} processes per runner, interleaved; {args.warmup} warm-up + {args.steps} timed steps each")
    head = (f"{'runner':<22} {'s/step (median, IQR)':>22} {'samples/s':>9} {'tok/s':>7} {'sup tok/s':>9} "
            f"{'startup s':>9} {'peak RSS':>9} {'step-1 loss':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    medians = {}
    for name in RUNNERS:
        steps, startups, rss, losses = [], [], [], []
        for r in results[name]:
            ends = r["ends"]
            steps += [b - a for a, b in zip(ends[args.warmup - 1 : -1], ends[args.warmup :])] if args.warmup else []
            startups.append(ends[0] - r["t0"])
            rss.append(r["rss"])
            losses.append(r["first_loss"])
        lo, med, hi = quartiles(steps)
        medians[name] = (med, statistics.median(startups))
        per = results[name][0].get("per_step")  # packed rows: samples and tokens per step of their own
        n_samples, n_real = (per["samples"], per["tokens"]) if per else (args.batch, real)
        n_sup = supervised / args.batch * n_samples  # the same samples, the same answers
        print(f"{name:<22} {med:>8.3f} ({lo:.3f}-{hi:.3f}) {n_samples / med:>9.2f} {n_real / med:>7.0f} "
              f"{n_sup / med:>9.0f} {statistics.median(startups):>9.1f} {max(rss) / 1e9:>7.2f}GB {losses[0]:>11.4f}")  # fmt: skip
    ours, hand, trl, full = (
        medians["lora_llava"],
        medians["hand loop"],
        medians["TRL"],
        medians["lora_llava full logits"],
    )
    print(f"supervised-only logits: step time {ours[0] / full[0]:.2f}x the full forward's")
    print(f"ratios: lora_llava / hand loop step time {ours[0] / hand[0]:.2f}x (target <= 1.0x); "
          f"lora_llava / TRL {ours[0] / trl[0]:.2f}x (target <= 0.6x); startup lora_llava {ours[1]:.1f}s vs TRL {trl[1]:.1f}s")  # fmt: skip
    print("(step-1 loss: lora_llava and the hand loop train on the same first batch with the same answer-only labels;")
    print(" TRL's completion-only labels come from its own rendering of the same samples)")
    print()
    print(
        f"memory by category (exact tensor bytes; lora_llava's model, first batch {memory['batch'][0]} x {memory['batch'][1]}):"
    )
    total = 0
    for label, n in memory["rows"]:
        total += n
        print(f"  {label:<62} {n / 2**20:>9.1f} MiB")
    print(f"  {'sum (the full forward)':<62} {total / 2**20:>9.1f} MiB")
    print("  with lora_llava's loss (train.supervised_logits, the default) instead:")
    for label, n in memory["supervised"]:
        print(f"  {label:<62} {n / 2**20:>9.1f} MiB")
    ours = total - sum(n for _, n in memory["rows"][-2:]) + sum(n for _, n in memory["supervised"])
    print(f"  {'sum (lora_llava)':<62} {ours / 2**20:>9.1f} MiB")
    for name, table in profiles.items():
        print(f"\nprofile of two steps, {name} (torch.profiler, self CPU time):\n{table}")


if __name__ == "__main__":
    main()
