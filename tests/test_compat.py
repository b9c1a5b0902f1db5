"""Pins every private transformers internal lora_llava relies on (lora_llava/compat.py): each test fails
loudly when an installed transformers changes the behaviour relied on."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainerCallback, TrainingArguments

from lora_llava.artifacts import resolve_backbone
from lora_llava.compat import allow_training_quantized_base, image_token_counts
from lora_llava.compat.trainer import CompatTrainer
from lora_llava.model.loading import load_processor


@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_image_token_counts_equal_what_the_processor_expands(name, _offline_cache):
    """The private arithmetic agrees with the public path: process an image, count its image tokens."""
    processor = load_processor(resolve_backbone(name).local_path())
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    sizes = [(32, 32), (40, 100), (90, 30), (64, 64), (300, 17)]  # (height, width)
    counted = []
    for h, w in sizes:
        enc = processor(text="<image>", images=[Image.new("RGB", (w, h))], return_tensors="pt")
        counted.append(int((enc["input_ids"] == image_id).sum()))
    assert image_token_counts(processor, sizes) == counted
    assert len(set(counted)) > 1 or name == "tiny"  # AnyRes counts depend on the size


def test_the_quantized_training_flag_is_what_the_trainer_checks(_offline_cache):
    from transformers.trainer_utils import validate_quantization_for_training

    from lora_llava.config.schema import QuantizationConfig
    from lora_llava.model.loading import load_base

    model, _ = load_base(resolve_backbone("tiny"), QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    allow_training_quantized_base(model)
    validate_quantization_for_training(model)


def test_trainer_private_hooks_keep_their_signatures():
    load = inspect.signature(Trainer._load_from_checkpoint)
    assert list(load.parameters) == ["self", "resume_from_checkpoint", "model"]
    sampler = inspect.signature(Trainer._get_train_sampler)
    assert list(sampler.parameters) == ["self", "train_dataset"]
    norm = inspect.signature(Trainer._get_grad_norm)
    assert list(norm.parameters) == ["self", "model", "grad_norm"]


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return {"loss": ((self.w(x) - y) ** 2).mean()}


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i), 1.0]), "y": torch.tensor([2.0 * i])}


class _Recording(CompatTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list = []

    def train_sampler(self, dataset):
        self.calls.append(("sampler", len(dataset)))
        return torch.utils.data.SequentialSampler(dataset)

    def load_checkpoint_weights(self, checkpoint, model):
        self.calls.append(("load", checkpoint))
        model.load_state_dict(torch.load(f"{checkpoint}/w.pt"))

    def save_model(self, output_dir=None, _internal_call=False):
        import os

        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.model.state_dict(), f"{output_dir}/w.pt")


class _CheckpointComplete(TrainerCallback):
    """What on_save sees: the checkpoint the Trainer has just written, whole."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_save(self, args, state, control, **kwargs):
        from pathlib import Path

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.seen.append(sorted(p.name for p in folder.iterdir()))


def test_sampler_and_checkpoint_hooks_are_called_and_on_save_sees_a_whole_checkpoint(tmp_path):
    def trainer(steps, cb):
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
            save_strategy="steps", use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True,
        )  # fmt: skip
        return _Recording(model=_Regression(), args=args, train_dataset=_Data(), callbacks=[cb])

    first = trainer(2, cb := _CheckpointComplete())
    first.train()
    assert ("sampler", 16) in first.calls
    assert cb.seen and {"w.pt", "trainer_state.json", "optimizer.pt"} <= set(cb.seen[-1])
    second = trainer(4, _CheckpointComplete())
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert ("load", str(tmp_path / "checkpoint-2")) in second.calls


def test_before_optimizer_step_sees_every_steps_unclipped_norm_before_the_update(tmp_path):
    seen = []

    class Watching(CompatTrainer):
        def before_optimizer_step(self, grad_norm):
            w = self.model.w.weight.detach().clone()
            true_norm = torch.sqrt(sum((p.grad**2).sum() for p in self.model.parameters()))
            seen.append((self.state.global_step, grad_norm, w))
            # clipping to 0.01 has already happened, the norm given is the one before it
            assert grad_norm > 0.01 and float(true_norm) <= 0.0100001

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        logging_steps=100, disable_tqdm=True, max_grad_norm=0.01, save_strategy="no",
    )  # fmt: skip
    t = Watching(model=_Regression(), args=args, train_dataset=_Data())
    t.train()
    assert [s for s, _, _ in seen] == [0, 1, 2]  # every optimizer step, though none of them logs
    assert not torch.equal(seen[0][2], seen[1][2])  # called before the step's update (weights moved between)


def test_use_attention_makes_a_built_model_call_the_registered_function():
    """The planner builds a model, then points its language model at a stand-in attention by name."""
    from transformers import AttentionInterface, LlamaConfig, LlamaModel

    from lora_llava.compat import use_attention

    calls = []

    def attention(module, query, key, value, *args, **kwargs):
        calls.append(query.shape)
        return torch.zeros_like(query).transpose(1, 2).contiguous(), None

    AttentionInterface.register("lora_llava_compat_test", attention)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32)  # fmt: skip
    model = LlamaModel(config)
    use_attention(model.config, "lora_llava_compat_test")
    model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert len(calls) == 2 and calls[0] == (1, 2, 5, 8)  # every layer, (batch, heads, tokens, head_dim)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_storage_keys_are_shared_by_views_and_freed_storages_are_seen(device):
    from lora_llava.compat import freed_storages, storage_ref

    a = torch.empty(4, 8, device=device)
    b = torch.empty(4, 8, device=device)
    key_a, ref_a = storage_ref(a)
    key_b, ref_b = storage_ref(b)
    assert isinstance(key_a, int) and key_a != key_b
    assert storage_ref(a.view(8, 4))[0] == storage_ref(a[1:])[0] == key_a  # views: one storage, one key
    assert freed_storages([key_a, key_b]) == []
    view = b.t()
    del b
    assert freed_storages([key_a, key_b]) == []  # a view keeps the storage alive
    del view
    assert freed_storages([key_a, key_b]) == [key_b]
    del a
    assert freed_storages([key_a, key_b]) == [key_a, key_b]
    del ref_a, ref_b


def test_watch_ops_sees_every_ops_outputs_the_backwards_included():
    from lora_llava.compat import watch_ops

    seen: list = []
    x = torch.ones(3, 2, device="meta", requires_grad=True)
    with watch_ops(lambda outputs: seen.append([tuple(t.shape) for t in outputs])):
        y = (x * 2).sum()
        y.backward()
    assert [(3, 2)] in seen and [()] in seen  # the forward's mul and sum
    assert x.grad is not None and x.grad.shape == (3, 2)
    forward = seen.index([()])
    assert [(3, 2)] in seen[forward + 1 :]  # the backward's gradient, seen as an op output too
    assert all(isinstance(shapes, list) for shapes in seen)
