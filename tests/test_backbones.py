"""Backbones of every family: LLaVA-NeXT AnyRes lengths, part placement per backbone, assembling a new
LLaVA, stage 1 -> stage 2, per-part policies, and merges that load with the right class."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from lora_llava.backbones.registry import registered_backbones, resolve_backbone
from lora_llava.config.schema import AssembleConfig, DataSource
from lora_llava.data.chat import format_for
from lora_llava.data.encode import Collator, Encoder
from lora_llava.data.formats import read_source
from lora_llava.errors import UserError
from lora_llava.model.loading import load_base, load_processor
from lora_llava.model.parts import check_policy
from lora_llava.model.trainability import attach_adapters


def _image(path, w, h):
    img = Image.new("RGB", (w, h), (230, 230, 230))
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200, 20, 20))
    img.save(path)


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory):
    """One single-image sample per aspect ratio (wide, tall, square, tiny, large)."""
    root = tmp_path_factory.mktemp("aspects")
    sizes = [(64, 64), (100, 40), (30, 90), (200, 210), (17, 300), (96, 33)]
    recs = []
    for i, (w, h) in enumerate(sizes):
        _image(root / f"{i}.png", w, h)
        recs.append(
            {
                "id": f"{w}x{h}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the shape?"},
                    {"from": "gpt", "value": "Red"},
                ],
            }
        )
    (root / "d.json").write_text(json.dumps(recs))
    samples, bad = read_source(DataSource(path=str(root / "d.json"), image_folder=str(root)))
    assert not bad
    return samples


def _next(max_tiles=None):
    from transformers import LlavaNextForConditionalGeneration

    spec = resolve_backbone("tiny-next")
    processor = load_processor(spec.local_path())
    model = LlavaNextForConditionalGeneration.from_pretrained(spec.local_path()).eval()
    if max_tiles:
        from lora_llava.model.anyres import apply_max_tiles

        apply_max_tiles(model, processor, max_tiles)
    return model, processor


@pytest.mark.parametrize("max_tiles", [None, 2])
def test_anyres_lengths_equal_what_the_model_consumes(aspect_data, max_tiles):
    model, processor = _next(max_tiles)
    enc = Encoder(processor, format_for("vicuna_v1", processor.tokenizer))
    image_id = processor.image_token_id
    counts = []
    for s in aspect_data:
        item = enc.encode(s)
        n_tokens = int((item["input_ids"] == image_id).sum())
        assert enc.length(s) == len(item["input_ids"])  # header-only length == the encoded sample
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=item["pixel_values"],
                image_sizes=item["image_sizes"],
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        consumed = sum(f.shape[0] for f in feats)
        assert n_tokens == consumed, s.id
        counts.append(n_tokens)
        # the full forward accepts it (transformers raises when tokens and features disagree)
        with torch.no_grad():
            out = model(**{k: v.unsqueeze(0) if k in ("input_ids", "labels") else v for k, v in item.items()})
        assert torch.isfinite(out.loss)
    assert len(set(counts)) >= 3  # aspect ratios really change the token count
    if max_tiles:
        full, _ = _next(None)
        enc_full = Encoder(_next(None)[1], format_for("vicuna_v1", processor.tokenizer))
        assert all(enc.length(s) <= enc_full.length(s) for s in aspect_data)
        assert any(enc.length(s) < enc_full.length(s) for s in aspect_data)
        assert all((p[0] // 32) * (p[1] // 32) <= 2 for p in processor.image_processor.image_grid_pinpoints)
        assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints


def test_anyres_batch_pads_tiles(aspect_data):
    model, processor = _next()
    enc = Encoder(processor, format_for("vicuna_v1", processor.tokenizer))
    items = [enc.encode(s) for s in aspect_data[:3]]
    tiles = [it["pixel_values"].shape[1] for it in items]
    assert len(set(tiles)) > 1
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape[:2] == (3, max(tiles))
    assert batch["image_sizes"].tolist() == [[64, 64], [40, 100], [90, 30]]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_max_tiles_too_small_is_a_user_error():
    from lora_llava.model.anyres import cap_tiles

    with pytest.raises(UserError, match="images.max_tiles=1 leaves no AnyRes grid"):
        cap_tiles([[32, 64], [64, 64]], 32, 1)


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    from lora_llava.backbones.assemble import assemble

    out = tmp_path_factory.mktemp("asm")
    return {
        "mlp": assemble(
            AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2"), out / "mlp", log=print
        ),
        "linear": assemble(
            AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2", projector="linear"),
            out / "linear",
            log=print,
        ),
    }


def test_assembled_is_a_standard_llava_with_the_parts_weights(assembled):
    from transformers import AutoModelForCausalLM, AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    from lora_llava.backbones.tiny import ensure_tiny

    path = assembled["mlp"]
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    lm = AutoModelForCausalLM.from_pretrained(ensure_tiny("tiny-qwen2"))
    clip = CLIPVisionModel.from_pretrained(ensure_tiny("tiny-clip"))
    for name, p in lm.model.named_parameters():
        if name != "embed_tokens.weight":
            assert torch.equal(p, model.model.language_model.get_parameter(name)), name
    for name, p in clip.named_parameters():
        assert torch.equal(p, model.model.vision_tower.get_parameter(name)), name
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    n_old = lm.get_input_embeddings().weight.shape[0]
    assert len(tok) == n_old + 1 and tok.convert_tokens_to_ids("<image>") == n_old
    assert model.config.image_token_id == n_old
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == model.lm_head.weight.shape[0] == model.config.text_config.vocab_size
    assert torch.equal(emb[:n_old], lm.get_input_embeddings().weight)
    meta = json.loads((path / "lora_llava.json").read_text())
    assert meta["chat_format"] == "chatml" and meta["added_tokens"] == ["<image>"]
    assert resolve_backbone(str(path)).chat_format == "chatml"
    # the processor's saved chat template renders what training renders
    msgs = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "Red"}]
    text, _ = format_for("chatml", tok).render([("user", "<image>\nWhat color?"), ("assistant", "Red")])
    assert processor.apply_chat_template(msgs, tokenize=False) == text


def test_assembled_linear_projector_is_one_linear_map(assembled):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(assembled["linear"])
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    lin2 = proj.linear_2
    assert torch.equal(lin2.weight, torch.eye(lin2.out_features)) and not lin2.bias.any()
    x = torch.randn(3, proj.linear_1.in_features)
    assert torch.allclose(proj(x), proj.linear_1(x), atol=1e-6)


def test_assemble_reuses_same_config_and_refuses_a_different_one(assembled):
    from lora_llava.backbones.assemble import assemble

    before = (assembled["mlp"] / "model.safetensors").stat().st_mtime_ns
    assert (
        assemble(AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2"), assembled["mlp"])
        == assembled["mlp"]
    )
    assert (assembled["mlp"] / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="holds a different assembled model"):
        assemble(AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2", seed=5), assembled["mlp"])


def test_assemble_rejects_a_non_vision_encoder():
    from lora_llava.backbones.assemble import assemble

    with pytest.raises(UserError, match="is a 'qwen2' model"):
        assemble(AssembleConfig(vision_encoder="tiny-qwen2", language_model="tiny-qwen2"), "/nonexistent/x")


@pytest.mark.parametrize("name", ["tiny", "tiny-next", "assembled"])
def test_quantization_and_lora_placement_per_backbone(name, make_recipe, assembled):
    backbone = str(assembled["mlp"]) if name == "assembled" else name
    recipe = make_recipe(backbone=backbone)
    spec = resolve_backbone(backbone)
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    rows = {r.role: r for r in check_policy(model, spec, recipe)}
    base = model.get_base_model()
    for role in ("vision_tower", "projector", "lm_head"):
        mods = [type(m).__name__ for m in base.get_submodule(spec.roles()[role]).modules()]
        assert "Linear4bit" not in mods and rows[role].linear_4bit == 0
    assert rows["language_model"].linear_4bit == 14 and rows["language_model"].lora_layers == 14
    lora_owners = {n.split(".lora_A")[0] for n, _ in base.named_modules() if n.endswith("lora_A")}
    assert all(n.startswith("model.language_model.layers.") for n in lora_owners)
    if name == "tiny-next":
        nl = base.model.image_newline
        assert nl.dtype == torch.float32 and nl.requires_grad and rows["image_newline"].trainable == nl.numel()
    else:
        assert "image_newline" not in rows


def test_vision_tower_policies(make_recipe):
    spec = resolve_backbone("tiny")
    for policy in ("lora", "full"):
        recipe = make_recipe(vision_tower={"policy": policy, "learning_rate": 1e-4})
        model, _ = load_base(spec, recipe.quantization)
        model = attach_adapters(model, spec, recipe)
        rows = {r.role: r for r in check_policy(model, spec, recipe)}
        vt = rows["vision_tower"]
        if policy == "lora":
            assert vt.lora_layers == 12 and 0 < vt.trainable < vt.params  # q,k,v,out,fc1,fc2 x 2 layers
        else:
            assert vt.lora_layers == 0 and vt.trainable == vt.params
        assert rows["language_model"].lora_layers == 14 and rows["lm_head"].trainable == 0
        from lora_llava.training.optim import optimizer_groups

        lrs = sorted(g["lr"] for g in optimizer_groups(model, spec, recipe))
        assert lrs == sorted([1e-4, recipe.train.learning_rate, recipe.projector.learning_rate or 3e-3])


def test_stage_rules_are_checked_at_load(make_recipe):
    with pytest.raises(UserError) as e:
        make_recipe(stage="align", language_model={"policy": "lora"}, projector={"policy": "frozen"})
    assert "language_model.policy: stage align trains only the projector" in str(e.value)
    assert "projector.policy: stage align trains the projector; it must be full" in str(e.value)
    with pytest.raises(UserError, match="assemble: required when backbone is `assemble`"):
        make_recipe(backbone="assemble")


def test_stage1_then_stage2_on_an_assembled_llava(make_recipe, shapes, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from lora_llava.workflows import train

    align = make_recipe(
        backbone="assemble",
        assemble={"vision_encoder": "tiny-clip", "language_model": "tiny-qwen2"},
        stage="align",
        output_dir=str(tmp_path / "align"),
        data={"train": [{"path": str(shapes / "align.json"), "image_folder": str(shapes / "images")}], "eval": []},
        train={"max_steps": 3},
    )
    train(align, log=lambda *_: None)
    run = tmp_path / "align"
    assert sorted(p.name for p in (run / "adapter").iterdir()) == sorted(
        [
            "chat_template.jinja",
            "lora_llava.json",
            "processor_config.json",
            "projector.safetensors",
            "recipe.yaml",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )  # no LoRA: only the projector trained
    assembled = LlavaForConditionalGeneration.from_pretrained(run / "assembled")
    aligned, info = LlavaForConditionalGeneration.from_pretrained(run / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = load_file(run / "adapter" / "projector.safetensors")
    for k, v in aligned.model.multi_modal_projector.state_dict().items():
        assert torch.allclose(v.float(), trained[k].float(), atol=1e-2), k
        assert not torch.equal(v.float(), assembled.model.multi_modal_projector.state_dict()[k].float()), k
    lm_a = aligned.model.language_model.layers[0].mlp.up_proj.weight
    lm_b = assembled.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(lm_a, lm_b.to(lm_a.dtype))  # the frozen LLM is kept as it was (no NF4 round trip)

    instruct = make_recipe(backbone=str(run), output_dir=str(tmp_path / "instruct"), train={"max_steps": 2})
    result = train(instruct, log=lambda *_: None)
    meta = json.loads((tmp_path / "instruct" / "adapter" / "lora_llava.json").read_text())
    assert meta["backbone"] == str(run / "model") and meta["chat_format"] == "chatml"
    assert result.steps == 2


def test_merge_of_a_next_run_loads_with_its_class(make_recipe, tmp_path):
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    from lora_llava.merging import merge
    from lora_llava.workflows import train

    recipe = make_recipe(
        backbone="tiny-next", output_dir=str(tmp_path / "run"), images={"max_tiles": 2}, train={"max_steps": 2}
    )
    train(recipe, log=lambda *_: None)
    report = merge(str(tmp_path / "run"), str(tmp_path / "merged"), log=lambda *_: None)
    assert AutoConfig.from_pretrained(tmp_path / "merged").architectures == ["LlavaNextForConditionalGeneration"]
    model, info = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(max(p) // 32 * (min(p) // 32) <= 2 for p in model.config.image_grid_pinpoints)
    assert report.parity.answers_equal == report.parity.answers_total
    assert report.parity.max_abs_logit_diff < 0.1
    # the trained image newline made it into the merged weights
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "projector.safetensors")["image_newline"]
    assert torch.allclose(model.model.image_newline.float(), saved.float(), atol=1e-2)


def test_every_registered_backbone_has_a_known_family_and_chat_format():
    from lora_llava.data.chat import _FORMATS

    for spec in registered_backbones():
        assert spec.family in ("llava", "llava_next")
        assert spec.chat_format in _FORMATS
    assert resolve_backbone("llava-hf/llava-v1.6-mistral-7b-hf").chat_format == "mistral_instruct"
    assert resolve_backbone("llava-hf/llava-v1.6-34b-hf").chat_format == "chatml_direct"
    assert resolve_backbone("llava-v1.6-vicuna-13b").model_class().__name__ == "LlavaNextForConditionalGeneration"


def test_unregistered_hub_id_is_read_from_its_config(monkeypatch, tmp_path):
    import huggingface_hub

    repo = {
        "config.json": json.dumps({"model_type": "llava_next"}),
        "chat_template.jinja": "{{ '[INST] ' }}{{ ' [/INST]' }}",
    }

    def fake_download(repo_id, filename, **kw):
        assert repo_id == "someone/my-llava-next"
        if filename not in repo:
            raise FileNotFoundError(filename)
        (tmp_path / filename).write_text(repo[filename])
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = resolve_backbone("someone/my-llava-next")
    assert (spec.family, spec.chat_format, spec.source) == ("llava_next", "mistral_instruct", "someone/my-llava-next")
    assert "chat format mistral_instruct (from its chat template)" in spec.inferred
    repo["config.json"] = json.dumps({"model_type": "qwen2"})
    with pytest.raises(UserError, match="model_type 'qwen2' is not a LLaVA model"):
        resolve_backbone("someone/my-llava-next")
    del repo["config.json"]
    with pytest.raises(UserError, match="its config.json could not be read from the Hub"):
        resolve_backbone("someone/my-llava-next")


@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_pad_to_square_pads_with_the_mean_color_and_counts_the_padded_size(name, aspect_data):
    processor = load_processor(resolve_backbone(name).local_path())
    fmt = format_for("vicuna_v1", processor.tokenizer)
    plain, padded = Encoder(processor, fmt), Encoder(processor, fmt, pad_to_square=True)
    wide = next(s for s in aspect_data if s.id == "100x40")
    img = padded.load(wide.images[0])
    mean = tuple(int(255 * m) for m in processor.image_processor.image_mean)  # truncated, as upstream LLaVA
    assert img.size == (100, 100) and img.getpixel((50, 2)) == mean and img.getpixel((50, 97)) == mean
    assert padded.image_sizes(wide) == [(100, 100)] and plain.image_sizes(wide) == [(100, 40)]
    item = padded.encode(wide)
    assert padded.length(wide) == len(item["input_ids"])
    if name == "tiny-next":  # AnyRes token counts follow the padded (square) size
        assert padded.length(wide) != plain.length(wide)
        assert item["image_sizes"].tolist() == [[100, 100]]
    else:
        assert padded.length(wide) == plain.length(wide)
        assert not torch.equal(item["pixel_values"], plain.encode(wide)["pixel_values"])


def test_stage1_with_text_only_batches_and_a_rerun(make_recipe, shapes, tmp_path):
    """Text-only samples reach no trainable weight while only the projector trains (chat-style stage 1; the
    plain format takes image-caption pairs only): no crash; re-running stage 1 replaces its model/."""
    from lora_llava.workflows import train

    recs = json.loads((shapes / "align.json").read_text())[:16]
    recs += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
             for i in range(8)]  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps(recs))
    recipe = make_recipe(
        stage="align", output_dir=str(tmp_path / "align"), chat={"format": "vicuna_v1"},
        data={"train": [{"path": str(tmp_path / "mixed.json"), "image_folder": str(shapes / "images")}], "eval": []},
        train={"max_steps": 6, "batch_size": 4},
    )  # fmt: skip
    first = train(recipe, log=lambda *_: None)
    assert first.steps == 6
    stamp = (tmp_path / "align" / "model" / "model.safetensors").stat().st_mtime_ns
    second = train(recipe, log=lambda *_: None)
    assert second.steps == 6
    assert (tmp_path / "align" / "model" / "model.safetensors").stat().st_mtime_ns != stamp


def test_backbone_paths_that_are_not_models_say_why(tmp_path):
    with pytest.raises(UserError, match="backbone directory 'runs/never-trained' does not exist") as e:
        resolve_backbone("runs/never-trained")
    assert "train its align recipe first" in str(e.value)
    import dataclasses

    from lora_llava.artifacts import AdapterMeta, write_meta

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    meta = AdapterMeta(backbone="tiny", source="builtin:tiny", family="llava", chat_format="plain", stage="align")
    write_meta(tmp_path / "run" / "adapter", meta)
    with pytest.raises(UserError, match="is a stage-1 run directory without model/"):
        resolve_backbone(str(tmp_path / "run"))
    write_meta(tmp_path / "run" / "adapter", dataclasses.replace(meta, stage="instruct"))
    with pytest.raises(UserError, match="is a stage-2 run \\(an adapter\\), not a model"):
        resolve_backbone(str(tmp_path / "run"))
    (tmp_path / "run" / "adapter" / "lora_llava.json").write_text("{}")
    with pytest.raises(UserError, match="lora_llava.json: unknown format None"):
        resolve_backbone(str(tmp_path / "run"))
