"""One optimizer step moves exactly the trained parts."""

from __future__ import annotations

import pytest
import torch
from helpers import PEFT_PREFIX, PROJECTOR, VISION

from lora_llava.model.loading import load_base
from lora_llava.model.trainability import attach_adapters


def test_one_optimizer_step_moves_only_projector_and_lora(spec, recipe):
    from lora_llava.data.batching import Collator, EncodedDataset
    from lora_llava.training.optim import optimizer_groups
    from lora_llava.training.prepare import prepare_run

    p = prepare_run(recipe)
    processor, encoder, report = p.processor, p.encoder, p.report
    batch = Collator(processor.tokenizer.pad_token_id)([EncodedDataset(report.train, encoder)[i] for i in range(4)])
    assert "pixel_values" in batch

    torch.manual_seed(0)
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    four_bit = {n for n, p in params.items() if type(p).__name__ == "Params4bit"}
    assert len(four_bit) == 14
    lora_a = {n for n in params if ".lora_A." in n}
    lora_b = {n for n in params if ".lora_B." in n}
    proj = {n for n in params if f".{PROJECTOR}." in n}
    assert len(lora_a) == len(lora_b) == 14 and len(proj) == 4
    assert all(not before[n].any() for n in lora_b)  # PEFT starts B at zero

    opt = torch.optim.AdamW(optimizer_groups(model, spec, recipe), lr=recipe.train.learning_rate)
    assert sum(len(g["params"]) for g in opt.param_groups) == 32
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    after = dict(model.named_parameters())
    for n in proj | lora_b:
        assert not torch.equal(before[n], after[n]), f"{n} did not move"
    # with B == 0 the gradient reaching A is exactly zero, so AdamW (no weight decay) leaves A in place
    for n in lora_a:
        assert torch.equal(before[n], after[n]), n
    frozen = set(params) - proj - lora_a - lora_b
    assert four_bit < frozen
    assert any(n.startswith(f"{PEFT_PREFIX}{VISION}.") for n in frozen)
    assert f"{PEFT_PREFIX}lm_head.weight" in frozen
    for n in frozen:
        assert after[n].grad is None, n
        assert torch.equal(before[n], after[n]), f"frozen {n} changed"


def test_each_part_gets_its_own_group_and_rate(spec, make_recipe):
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters
    from lora_llava.training.optim import optimizer_groups

    recipe = make_recipe(
        projector={"learning_rate": 1e-3},
        vision_tower={"policy": "full", "learning_rate": 1e-5},
        train={"learning_rate": 2e-4, "weight_decay": 0.1},
    )
    model = attach_adapters(load_base(spec, recipe.quantization)[0], spec, recipe)
    groups = {g["name"]: g for g in optimizer_groups(model, spec, recipe)}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "language_model": (2e-4, 0.1),
        "projector": (1e-3, 0.0),
        "vision_tower": (1e-5, 0.1),
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(any(p is q for q in model.get_submodule("base_model.model.model.vision_tower").parameters())
               for p in groups["vision_tower"]["params"])  # fmt: skip
    frozen = make_recipe(projector={"policy": "frozen"})
    model = attach_adapters(load_base(spec, frozen.quantization)[0], spec, frozen)
    assert [g["name"] for g in optimizer_groups(model, spec, frozen)] == ["language_model"]


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_train_keep_8bit_state_and_skip_bad_steps(make_recipe, monkeypatch, name):
    import torch
    from safetensors.torch import load_file

    from lora_llava.layout import RunDir
    from lora_llava.workflows import train

    monkeypatch.setenv("LORA_LLAVA_FAULTS", "nan_loss@2")
    recipe = make_recipe(train={"max_steps": 3, "save_steps": 1, "optimizer": name})
    result = train(recipe, log=lambda *_: None)
    ckpts = RunDir(recipe.output_dir).checkpoints
    state = torch.load(ckpts / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"]
    moments = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state.values()]
    # bitsandbytes keeps 8-bit moments for tensors of at least 4096 elements (the 64x64 projector here)
    assert {m.dtype for m in moments if m.numel() >= 4096} == {torch.uint8}
    assert {m.dtype for m in moments if m.numel() < 4096} == {torch.float32}
    w1, w2 = (load_file(ckpts / f"checkpoint-{n}" / "adapter_model.safetensors") for n in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the NaN step 2 was skipped
    assert result.steps == 3 and all(
        torch.isfinite(t).all() for t in load_file(result.adapter_dir / "adapter_model.safetensors").values()
    )
