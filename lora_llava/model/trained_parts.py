"""Saving and restoring what training changed, and rebuilding a trained model from its adapter.

Usage::

    save_trained_parts(model, spec, recipe, folder)     # LoRA (PEFT files), projector, vision tower if full
    restore_trained_parts(model, spec, folder)          # the projector (+ image newline), vision tower
    model, processor, meta = load_adapter_model("runs/quickstart/adapter")   # the trained model, as trained
    require_trained_files(folder, recipe, meta)         # every part the metadata says was trained has its file
    verify_adapter_weights(model, folder, meta.versions)   # every saved tensor loaded, every trained module got one

Loading never half-succeeds: a saved tensor that finds no module, a trained module that gets no tensor (key
names changed between transformers/PEFT versions, a damaged or edited file) or a trained part's missing file
is a UserError naming the file, the keys and the versions the artifact was saved with, never a model that
silently answers like the base. File names are the artifact layout's (``lora_llava.artifacts``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lora_llava.annotations import Model, Processor
from lora_llava.artifacts import resolve_backbone
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError
from lora_llava.layout import (
    LORA_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    PROJECTOR_FILE,
    RECIPE_FILE,
    VISION_FILE,
    AdapterMeta,
    read_meta,
)
from lora_llava.model.loading import load_base, load_processor
from lora_llava.model.trainability import connector_state, get_module, image_newline, prepare_projector
from lora_llava.versions import LOADERS, drift, package_versions


def has_lora(folder: Path) -> bool:
    return (Path(folder) / LORA_CONFIG_FILE).is_file()


def save_trained_parts(model: Model, spec: BackboneSpec, recipe: Recipe, out: Path) -> None:
    """Write what training changed: LoRA (PEFT files), projector (+ image newline), vision tower if full."""
    from safetensors.torch import save_file

    full_parts: dict[str, dict[str, torch.Tensor]] = {}
    if recipe.projector.policy == "full":
        state = connector_state(model, spec)
        save_file(state, out / PROJECTOR_FILE)
        full_parts[spec.projector] = {k: v for k, v in state.items() if k != "image_newline"}
    if recipe.vision_tower.policy == "full":
        vt = get_module(model, spec.vision_tower)
        state = {k: v.detach().cpu().contiguous() for k, v in vt.state_dict().items()}
        save_file(state, out / VISION_FILE)
        full_parts[spec.vision_tower] = state
    if hasattr(model, "peft_config"):
        model.save_pretrained(out, safe_serialization=True)
        add_modules_to_save(out, full_parts)


def add_modules_to_save(folder: Path, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Make the PEFT adapter in ``folder`` carry the fully trained parts (the projector, a fully trained
    vision tower) as ``modules_to_save``, so plain ``PeftModel.from_pretrained`` restores them too.

    Keys and config are what PEFT itself writes for ``LoraConfig(modules_to_save=[...])``. LLaVA-NeXT's
    image newline is a bare parameter PEFT cannot carry; it stays in projector.safetensors.
    """
    import json

    from safetensors.torch import load_file, save_file

    if not parts:
        return
    weights = load_file(folder / LORA_WEIGHTS_FILE)
    for path, state in parts.items():
        weights.update({f"base_model.model.{path}.{k}": v for k, v in state.items()})
    save_file(weights, folder / LORA_WEIGHTS_FILE, metadata={"format": "pt"})
    config = json.loads((folder / LORA_CONFIG_FILE).read_text())
    names = sorted({*(config.get("modules_to_save") or []), *(p.rsplit(".", 1)[-1] for p in parts)})
    config["modules_to_save"] = names
    (folder / LORA_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def restore_trained_parts(model: Model, spec: BackboneSpec, folder: Path) -> bool:
    """Load the trained projector (+ image newline) and, when trained fully, the vision tower; every key fits.
    Returns whether that changed the model (a projector equal to the base's, and no vision tower, changes nothing).
    """
    from safetensors.torch import load_file

    proj, nl, vt = get_module(model, spec.projector), image_newline(model, spec), get_module(model, spec.vision_tower)
    versions = versions_in(folder)
    path, vpath = folder / PROJECTOR_FILE, folder / VISION_FILE
    before = {k: v.detach().clone() for k, v in proj.state_dict().items()} if path.is_file() else {}
    if path.is_file():
        with readable_weights(path, versions):
            state = load_file(path)
            nl_saved = state.pop("image_newline", None)
            if (nl_saved is None) != (nl is None):
                problem = f"image_newline {'missing' if nl is not None else 'unexpected'} for this backbone"
                raise load_error(path, [problem], versions)
            missing, unexpected = proj.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise load_error(path, key_problems(unexpected, missing), versions)
            if nl is not None and nl_saved is not None:
                if nl_saved.shape != nl.shape:
                    raise load_error(path, ["1 tensor(s) of another shape: image_newline"], versions)
                nl.data = nl_saved.to(nl.device, nl.dtype)
        _same_copies(folder, path, spec.projector, versions)
    if vpath.is_file():
        _same_copies(folder, vpath, spec.vision_tower, versions)
        with readable_weights(vpath, versions):
            missing, unexpected = vt.load_state_dict(load_file(vpath), strict=False)
        if missing or unexpected:
            raise load_error(vpath, key_problems(unexpected, missing), versions)
    if path.is_file():
        prepare_projector(model, spec, trainable=False)
    changed = any(not torch.equal(v.float(), before[k].float()) for k, v in proj.state_dict().items() if k in before)
    return changed or vpath.is_file()


@contextmanager
def readable_weights(path: Path, versions: dict[str, Any]) -> Iterator[None]:
    """Loading ``path``: a file safetensors cannot read, or tensors whose shapes are not the model's, is a
    ``load_error`` naming the file and the tensors, never a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise load_error(path, [f"not a readable safetensors file ({e})"], versions) from None
    except RuntimeError as e:
        text = str(e)
        shapes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (\S+ ?\S*) from checkpoint, "
                            r"the shape in current model is (\S+ ?\S*)\.", text)  # fmt: skip
        if not shapes and "size" not in text and "shape" not in text:
            raise
        found = [f"{k} ({a.rstrip('.')} in the file, {b.rstrip('.')} in the model)" for k, a, b in shapes]
        problem = f"{len(found)} tensor(s) of another shape: {_few(found)}" if found else text.splitlines()[0]
        raise load_error(path, [problem], versions) from None


def _same_copies(folder: Path, part_file: Path, module: str, versions: dict[str, Any]) -> None:
    """A fully trained part is saved twice: in its own file and, for PEFT, as modules_to_save in the adapter.
    The two must hold the same tensors (one of them edited or swapped: which one would answer is a matter
    of which loader runs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    lora = folder / LORA_WEIGHTS_FILE
    if not lora.is_file():
        return
    prefix = f"base_model.model.{module}."
    with readable_weights(lora, versions), safe_open(str(lora), "pt") as f:
        copies = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not copies:  # written before parts rode along as modules_to_save
        return
    with readable_weights(part_file, versions):
        own = {k: v for k, v in load_file(part_file).items() if k != "image_newline"}
    differ = sorted(
        k
        for k in own.keys() | copies.keys()
        if k not in own or k not in copies or not torch.equal(own[k].to(copies[k].dtype), copies[k])
    )
    if differ:
        raise load_error(
            part_file,
            [f"{len(differ)} tensor(s) differ from their copy in {LORA_WEIGHTS_FILE}: {_few(differ)}"],
            versions,
        )


def versions_in(folder: Path) -> dict[str, Any]:
    """The versions the artifact in ``folder`` was saved with ({} when unrecorded or unreadable)."""
    try:
        meta = read_meta(folder)
    except UserError:
        return {}
    return meta.versions if meta is not None else {}


def saved_with(versions: dict[str, Any]) -> str:
    """``saved with transformers 5.25.0, peft 0.21.2 (installed: transformers 5.25.0, peft 0.21.2)``."""
    now = package_versions(LOADERS)
    then = ", ".join(f"{n} {versions[n]}" for n in LOADERS if versions.get(n)) or "unrecorded versions"
    return f"saved with {then} (installed: {', '.join(f'{n} {now[n]}' for n in LOADERS)})"


def load_error(path: Path, problems: list[str], versions: dict[str, Any]) -> UserError:
    """The refusal to load ``path``: what did not fit, the versions it was saved with, and what to do."""
    changed = drift(versions, package_versions(LOADERS))
    if changed:
        pins = " ".join(f"{n}=={versions[n]}" for n in LOADERS if versions.get(n))
        hint = f"{', '.join(changed)} may name the weights differently: load it with `pip install {pins}`, or re-train"
    elif not any(versions.get(n) for n in LOADERS):
        hint = "it records no versions (older lora_llava): load it with the transformers/peft it was trained with"
    else:
        hint = "the file does not fit the model it was saved for (damaged or edited?): copy it again, or re-train"
    return UserError(f"{path}: {'; '.join(problems)}; {saved_with(versions)}", hint=hint)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3 else "")


def key_problems(unexpected: list[str], missing: list[str], differ: list[str] | None = None) -> list[str]:
    """What a comparison of saved and expected keys found, keys named (the first few, and how many)."""
    found = [(unexpected, "unexpected (found no module)"), (missing, "missing (left untrained)")]
    found.append((differ or [], "not loaded (the model's values differ from the file's)"))
    return [f"{len(keys)} {what}: {_few(sorted(keys))}" for keys, what in found if keys]


def require_trained_files(folder: Path, recipe: Recipe, meta: AdapterMeta | None) -> None:
    """Every part the metadata (or, without it, the recipe) says was trained has its file in ``folder``."""
    trained = meta.projector_trained if meta is not None else recipe.projector.policy == "full"
    needed = [PROJECTOR_FILE] if trained else []
    needed += [VISION_FILE] if recipe.vision_tower.policy == "full" else []
    if "lora" in (recipe.lm_policy, recipe.vision_tower.policy):
        needed += [LORA_CONFIG_FILE, LORA_WEIGHTS_FILE]
    absent = [name for name in needed if not (folder / name).is_file()]
    if absent:
        raise UserError(
            f"{folder}: {', '.join(absent)} missing, though its recipe and metadata say that part was trained; "
            f"{saved_with(meta.versions if meta is not None else {})}",
            hint="the folder is incomplete: copy the whole folder again, or re-train",
        )


def verify_adapter_weights(
    model: Model, folder: Path, versions: dict[str, Any], restored_apart: tuple[str, ...] = ()
) -> None:
    """Every tensor of ``folder``'s adapter_model.safetensors reached its module with its value, and every
    tensor PEFT saves for ``model`` (LoRA, modules_to_save) came from the file. Names are compared as PEFT
    loads them (it renames keys saved by older transformers). ``restored_apart``: module paths whose saved
    tensors are checked elsewhere (the trainer's projector / vision tower, from their own files)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / LORA_WEIGHTS_FILE
    skip = tuple(f"base_model.model.{p}." for p in restored_apart)
    with readable_weights(path, versions):
        saved = _as_peft_loads(model, load_file(path))
    saved = {k: v for k, v in saved.items() if not k.startswith(skip)}
    live = {k: v for k, v in get_peft_model_state_dict(model).items() if not k.startswith(skip)}
    differ = [k for k in saved.keys() & live.keys() if not _same(live[k], saved[k])]
    problems = key_problems(sorted(saved.keys() - live.keys()), sorted(live.keys() - saved.keys()), differ)
    if problems:
        raise load_error(path, problems, versions)


def _as_peft_loads(model: Model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors under the names PEFT loads them as (with transformers 5, older names converted)."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    except ImportError:  # a PEFT or transformers without weight conversion: loaded as named
        return state
    converted: dict[str, torch.Tensor] = convert_peft_adapter_state_dict_for_transformers(
        model, model.peft_config["default"], state
    )
    return converted


def _same(live: torch.Tensor, saved: torch.Tensor) -> bool:
    """The live tensor holds the saved one, as loading casts it (to the live dtype)."""
    return live.shape == saved.shape and torch.equal(live.detach().cpu(), saved.to(live.dtype))


def load_peft_adapter(model: Model, folder: Path, versions: dict[str, Any]) -> Model:
    """``PeftModel.from_pretrained`` that never half-succeeds: a key PEFT finds no tensor for is a UserError,
    and what it loaded is verified tensor by tensor."""
    from peft import PeftModel
    from safetensors import safe_open

    try:
        with readable_weights(folder / LORA_WEIGHTS_FILE, versions):
            model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    except KeyError as e:  # a modules_to_save key under another name: PEFT looks it up in the file and fails
        with safe_open(str(folder / LORA_WEIGHTS_FILE), "pt") as f:
            keys = list(f.keys())
        modules = dict(model.named_modules())
        # the fully trained parts' tensors first: those PEFT looked for (LoRA keys it may still have renamed)
        unplaced = sorted((k for k in keys if _module_of(k) not in modules), key=lambda k: (".lora_" in k, k))
        problems = [f"{len(unplaced)} unexpected (found no module): {_few(unplaced)}"] if unplaced else []
        problems.append(f"1 missing (left untrained): {e.args[0]}")
        if not keys:
            problems.append("the file holds no tensors")
        raise load_error(folder / LORA_WEIGHTS_FILE, problems, versions) from None
    verify_adapter_weights(model, folder, versions)
    return model


def _module_of(key: str) -> str:
    """The module a saved adapter tensor belongs to, by its name in the base model."""
    path = key.removeprefix("base_model.model.")
    return path.split(".lora_", 1)[0] if ".lora_" in path else path.rsplit(".", 1)[0]


def load_adapter_model(
    adapter_dir: Path, meta: AdapterMeta, dtype: torch.dtype | None = None
) -> tuple[Model, Processor, Recipe]:
    """Rebuild a trained model: base as recorded, trained projector, LoRA weights; nothing left fresh."""
    from lora_llava.config.load import load_recipe

    recipe = load_recipe(adapter_dir / RECIPE_FILE)
    require_trained_files(adapter_dir, recipe, meta)
    spec = resolve_backbone(meta.backbone)
    model, _ = load_base(spec, recipe.quantization, dtype=dtype, max_tiles=recipe.images.max_tiles)
    restore_trained_parts(model, spec, adapter_dir)
    if has_lora(adapter_dir):
        model = load_peft_adapter(model, adapter_dir, meta.versions)
    model.eval()
    return model, load_processor(adapter_dir), recipe
