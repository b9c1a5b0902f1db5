"""The memory planner: its estimate against the tensor memory a real CPU training step allocates on the tiny
backbones (within plan.STATED_ERROR), exact weight/LoRA/optimizer bytes, the micro-batch suggestion, and a plan
for every shipped recipe offline (Hub backbones from the built-in configs)."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli, shipped_recipes

from lora_llava import plan as planner
from lora_llava.errors import UserError


def _storages(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _quant_tensors(model):
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            yield from (qs.absmax, qs.code)
            if getattr(qs, "state2", None) is not None:
                yield from (qs.state2.absmax, qs.state2.code)
            if isinstance(getattr(qs, "offset", None), torch.Tensor):
                yield qs.offset


def measure_step(recipe, batch: int) -> tuple[int, int, dict]:
    """(peak tensor bytes of the second training step, its batch width, the step's input): the model exactly as
    training builds it, the first ``batch`` samples of the data through the Collator, the trainer's optimizer.
    Peak = every tensor alive before the step (exact bytes: weights, 4-bit constants, optimizer state, input)
    + the highest running sum of the CPU allocations the step makes (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import set_seed

    from lora_llava.data.batching import Collator
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters
    from lora_llava.training.optim import GuardedAdamW, optimizer_groups
    from lora_llava.training.prepare import prepare_run

    prepared = prepare_run(recipe, None, log=lambda *a: None)
    samples = sorted(prepared.report.train, key=prepared.report.length_of, reverse=True)[:batch]
    inputs = Collator(prepared.processor.tokenizer.pad_token_id)(prepared.encoder.encode_batch(samples))
    set_seed(0)
    model, _ = load_base(prepared.spec, recipe.quantization)
    model = attach_adapters(model, prepared.spec, recipe)
    model.train()
    opt = GuardedAdamW(optimizer_groups(model, prepared.spec, recipe), lr=1e-4)

    from lora_llava.training.loss import supervised_loss

    def step() -> None:  # the loss training computes (logits only at supervised positions, unless turned off)
        (supervised_loss(model, inputs) if recipe.train.supervised_logits else model(**inputs).loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    state = [t for s in opt.state.values() for t in s.values()]
    before = _storages([*model.parameters(), *model.buffers(), *_quant_tensors(model), *state, *inputs.values()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = high = 0
    for e in events:
        running += e.nbytes()
        high = max(high, running)
    return before + high, inputs["input_ids"].shape[1], inputs


@pytest.mark.parametrize(
    "backbone, overrides",
    [
        ("tiny", ["train.batch_size=8"]),
        ("tiny", ["train.batch_size=8", "train.supervised_logits=false"]),  # the model's own full forward
        ("tiny-next", ["train.batch_size=4", "lora.r=32", "train.gradient_checkpointing=true"]),
    ],
)
def test_estimate_within_stated_error_of_a_measured_cpu_step(make_recipe, backbone, overrides):
    recipe = make_recipe(overrides=[f"backbone={backbone}", "lora.dropout=0.05", *overrides])
    measured, width, inputs = measure_step(recipe, recipe.train.batch_size)
    supervised = float((inputs["labels"][:, 1:] != -100).sum()) / len(inputs["labels"])  # per sample
    plan = planner.plan_memory(recipe, device="cpu", seq_len=width, supervised=supervised)
    error = abs(plan.tensors - measured) / measured
    assert error <= planner.STATED_ERROR, (plan.table(), measured, error)
    assert "CUDA context" not in plan.categories and plan.total == plan.tensors


def test_weights_lora_and_optimizer_bytes_are_exact(make_recipe):
    from lora_llava.artifacts import resolve_backbone
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters

    recipe = make_recipe()
    spec = resolve_backbone("tiny")
    model = attach_adapters(load_base(spec, recipe.quantization)[0], spec, recipe)
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    four_bit = _storages([p for p in model.parameters() if type(p).__name__ == "Params4bit"])
    four_bit += _storages(_quant_tensors(model))  # absmax, second-level absmax and codes, offset
    plan = planner.plan_memory(recipe, device="cpu", seq_len=64)
    assert plan.categories["LoRA"] == lora
    assert plan.categories["optimizer state (adamw)"] == 8 * trainable
    assert plan.categories["4-bit weights"] == pytest.approx(four_bit, rel=0.01)


def test_memory_grows_with_batch_and_the_suggestion_keeps_the_global_batch(make_recipe):
    recipe = make_recipe(overrides=["train.batch_size=4", "train.grad_accum=4"])
    small = planner.plan_memory(recipe, device="cpu", seq_len=128)
    assert small.fits is None and small.suggestion is None
    big = planner.plan_memory(make_recipe(overrides=["train.batch_size=8", "train.grad_accum=2"]), device="cpu",
                              seq_len=128)  # fmt: skip
    assert big.categories["activations"] > 1.8 * small.categories["activations"]
    limit = (small.total + big.total) // 2  # batch 4 fits, 8 does not
    plan = planner.plan_memory(make_recipe(overrides=["train.batch_size=16", "train.grad_accum=1"]),
                               gpu_memory=limit, device="cpu", seq_len=128)  # fmt: skip
    assert plan.fits is False
    s = plan.suggestion
    assert s is not None and s.fits and s.micro_batch * s.grad_accum == 16 and s.micro_batch == 4
    assert s.total <= limit
    assert "suggested: train.batch_size=4 train.grad_accum=4" in plan.table()
    nothing = planner.plan_memory(recipe, gpu_memory=1024, device="cpu", seq_len=128)
    assert nothing.suggestion is not None and not nothing.suggestion.fits
    assert "even train.batch_size=1" in nothing.table()


def test_cuda_plan_adds_the_overheads_and_parse_size(make_recipe):
    plan = planner.plan_memory(make_recipe(), gpu_memory="24GB", seq_len=64)
    cpu = planner.plan_memory(make_recipe(), device="cpu", seq_len=64)
    assert plan.device == "cuda" and plan.categories["CUDA context"] == planner.CUDA_OVERHEAD
    assert plan.total > plan.tensors and plan.gpu_memory == 24 * 1024**3 and plan.fits
    # cuBLAS' workspace is allocated memory: part of the tensors a measured allocator peak holds
    assert plan.categories["cuBLAS workspace"] == planner.CUBLAS_WORKSPACE and "cuBLAS workspace" not in cpu.categories
    assert plan.tensors >= planner.CUBLAS_WORKSPACE + sum(cpu.categories.values()) - cpu.categories.get(
        "optimizer step temporaries", 0
    )


def test_optimizer_step_temporaries_follow_the_device_and_optimizer(make_recipe):
    """torch's AdamW runs foreach on CUDA (an intermediate per trained weight), tensor by tensor elsewhere and in
    bitsandbytes' 8-bit optimizers (two of the largest tensor); a long-vocabulary-free step peaks there."""
    recipe = make_recipe(train={"batch_size": 1})
    trainable = planner.plan_memory(recipe, device="cpu", seq_len=8).categories["optimizer state (adamw)"] // 8
    cuda = planner.plan_memory(recipe, device="cuda", seq_len=8)
    assert cuda.peak_at == "optimizer step"
    assert cuda.categories["optimizer step temporaries"] == 4 * trainable
    assert cuda.categories["gradients"] == 4 * trainable
    cpu = planner.plan_memory(recipe, device="cpu", seq_len=8)
    if cpu.peak_at == "optimizer step":
        assert cpu.categories["optimizer step temporaries"] < 4 * trainable
    eight = planner.plan_memory(
        make_recipe(train={"batch_size": 1, "optimizer": "adamw_8bit"}), device="cuda", seq_len=8
    )
    assert eight.categories.get("optimizer step temporaries", 0) < 4 * trainable


def test_the_step_does_not_count_the_weights_it_reads():
    """A linear layer's forward views its weight (the transposed weight of the matmul): the weight is the
    model's, allocated before the step, and only the output is the step's."""
    from lora_llava.plan.tracker import LiveTensors

    layer = torch.nn.Linear(256, 512, bias=False, device="meta", dtype=torch.bfloat16)
    x = torch.empty(4, 256, device="meta", dtype=torch.bfloat16)
    held = LiveTensors(vocab=1000, held=list(layer.parameters()))
    with held.mode():
        y = layer(x)
        held.saw([])
    assert held.peak == y.numel() * 2 == 4 * 512 * 2
    naive = LiveTensors(vocab=1000)
    with naive.mode():
        y = layer(x)
        naive.saw([])
    assert naive.peak > held.peak  # without ``held``, the weight's storage would count as the step's
    assert planner.parse_size("800MB") == 800 * 1024**2 and planner.parse_size("80") == 80 * 1024**3
    with pytest.raises(UserError, match="not a size"):
        planner.parse_size("lots")


def test_preload_warning_is_none_without_cuda(make_recipe):
    assert planner.preload_warning(make_recipe()) is None


def test_real_llava_15_7b_from_builtin_config(monkeypatch):
    """Offline, no cache: the registered Hub backbone is planned from its built-in config; exact counts."""
    from lora_llava.config.load import load_recipe
    from lora_llava.recipes import recipe_path

    recipe = load_recipe(recipe_path("llava-1.5-7b/qlora"))
    plan = planner.plan_memory(recipe, gpu_memory="24GB")
    assert plan.config_source == "built-in config (offline)" and plan.seq_len == 2048
    _, spec, source = planner.backbone_config(recipe)
    assert source.origin is planner.ConfigOrigin.OFFLINE and not source.origin.has_processor
    assert spec.offline_config is not None  # the registry's row is where the offline config lives
    assert plan.categories["LoRA"] == 319_815_680 * 4  # LLaVA-1.5-7B's LoRA at r=128, float32
    nf4 = planner.nf4_bytes
    assert plan.categories["4-bit weights"] == 32 * (4 * nf4(4096 * 4096, True) + 3 * nf4(4096 * 11008, True))
    assert plan.categories["4-bit weights"] == pytest.approx(6.476e9 * (0.5 + 1 / 64), rel=1e-3)
    assert 12 * 1024**3 < plan.total < 24 * 1024**3 and plan.fits


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: str(p.parent.name + "/" + p.stem))
def test_plan_runs_on_every_shipped_recipe(capsys, path):
    code, out, err = run_cli(capsys, "plan", str(path), "--gpu-memory", "24GB", "--seq-len", "512")
    assert code == 0, err
    assert "total (peak at the" in out and ("fits in 24.00 GiB" in out or "does NOT fit" in out)


def test_plan_cli_reads_the_data_lengths(capsys, shapes, tmp_path):
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", shapes)
    code, out, err = run_cli(capsys, "plan", str(recipe))
    assert code == 0, err
    assert "the longest of" in out and "training samples" in out


def test_where_the_config_came_from_decides_whether_the_data_is_read(make_recipe):
    """A typed origin, not words in the description: only a local config has its processor at hand."""
    from lora_llava.plan.configs import ConfigOrigin, ConfigSource
    from lora_llava.plan.lengths import sequence_plan

    recipe = make_recipe()
    _, _, source = planner.backbone_config(recipe)
    assert source.origin is ConfigOrigin.LOCAL and str(source) == "config from the built-in backbone"
    assert [o for o in ConfigOrigin if o.has_processor] == [ConfigOrigin.LOCAL]
    # a description that happens to say "offline" no longer decides anything
    seq, _, how, _ = sequence_plan(recipe, ConfigSource(ConfigOrigin.LOCAL, "config from /data/offline/x"))
    assert how.startswith("the longest of")
    seq, images, how, sup = sequence_plan(recipe, ConfigSource(ConfigOrigin.STAGE1_PENDING, "anything"))
    assert (seq, images, sup) == (recipe.data.max_length, 1, None)
    assert how == "data.max_length; data not read: the backbone's processor is not available here"


def test_unknown_hub_backbone_is_one_clear_line(capsys, shapes, tmp_path):
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", shapes)
    code, out, err = run_cli(capsys, "plan", str(recipe), "backbone=someone/llava-nobody-has")
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_train_on_cuda_warns_before_loading_weights_when_the_plan_exceeds_the_card(make_recipe, monkeypatch):
    import lora_llava.model.loading as loading
    from lora_llava.workflows import train

    recipe = make_recipe(overrides=["train.batch_size=8", "train.max_steps=1"])
    # a pretend 40 MB card: the plan (~25 MiB of tensors + the CUDA context) does not fit
    monkeypatch.setattr(planner.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(planner.torch.cuda, "mem_get_info", lambda i=0: (40_000_000, 40_000_000))
    warning = planner.preload_warning(recipe)
    assert warning is not None and warning.startswith("warning: the memory plan of this run (")
    assert "exceeds this GPU's 38.15 MiB" in warning and "lora-llava plan" in warning
    monkeypatch.setattr(planner.torch.cuda, "mem_get_info", lambda i=0: (80 * 2**30, 80 * 2**30))
    assert planner.preload_warning(recipe) is None  # fits
    monkeypatch.undo()

    # train logs it before any weight is loaded
    events: list[str] = []
    monkeypatch.setattr(planner, "preload_warning", lambda r, log=None: "warning: the memory plan (stand-in)")
    real_load = loading.load_base

    def load(*a, **k):
        events.append("load")
        return real_load(*a, **k)

    monkeypatch.setattr("lora_llava.training.trainable.load_base", load)
    train(recipe, log=events.append)
    assert events.index("warning: the memory plan (stand-in)") < events.index("load")


def test_the_same_plan_every_time(make_recipe):
    """The tracker keys storages by the address of their StorageImpl, which the allocator reuses: a plan must not
    depend on which storages happened to reuse an address (run after run, between other allocations)."""
    from lora_llava.config.load import load_recipe
    from lora_llava.plan import estimate
    from lora_llava.recipes import recipe_path

    for recipe, seq in ((load_recipe(recipe_path("llava-1.5-7b/qlora")), 1024), (make_recipe(), 96)):
        plans = []
        for churn in range(4):
            estimate._PASSES.clear()
            kept = [torch.empty(n, device="meta") for n in range(1, 50 * churn + 2)]  # other storages come and go
            plans.append(planner.plan_memory(recipe, gpu_memory="24GB", seq_len=seq).categories)
            del kept
        assert all(p == plans[0] for p in plans), plans


def test_next_image_newline_counts_as_projector_and_advice_skips_what_is_on(make_recipe):
    recipe = make_recipe(backbone="tiny-next")
    plan = planner.plan_memory(recipe, device="cpu", seq_len=96)
    assert "vision tower (trained)" not in plan.categories  # the frozen tower trains nothing
    hidden = 64  # tiny-next's text hidden size: one float32 newline vector beside the projector
    no_newline = planner.plan_memory(make_recipe(), device="cpu", seq_len=96).categories["projector"]
    assert plan.categories["projector"] == no_newline + 4 * hidden
    on = planner.plan_memory(
        make_recipe(overrides=["train.gradient_checkpointing=true"]), gpu_memory=1024, device="cpu", seq_len=96
    ).table()
    off = planner.plan_memory(make_recipe(), gpu_memory=1024, device="cpu", seq_len=96).table()
    assert "turn on train.gradient_checkpointing" in off and "gradient_checkpointing" not in on.split("needs")[-1]
