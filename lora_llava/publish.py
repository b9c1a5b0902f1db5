"""Publishing adapters and merged models to the Hugging Face Hub, with a model card.

Usage::

    plan = plan_push("runs/x", "me/my-adapter")     # private; the allow-listed files; the card
    print(plan.describe()); url = push(plan)        # the token from HF_TOKEN or the login cache, never printed
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_llava.annotations import Log
from lora_llava.artifacts import Lineage, MergeCheck
from lora_llava.card import CardFacts, render_card, scrub
from lora_llava.config.yamlsafe import load_yaml
from lora_llava.layout import (
    LORA_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    MERGE_REPORT_FILE,
    META_FILE,
    MODEL_CONFIG_FILE,
    PROCESSOR_CONFIG_FILE,
    PROJECTOR_FILE,
    RECIPE_FILE,
    TOKENIZER_CONFIG_FILE,
    VISION_FILE,
)

# what a pushed repo may hold: weights as safetensors, configs, the processor; never optimizer, scheduler
# or RNG state, pickles, or checkpoints
PROCESSOR_FILES = (
    PROCESSOR_CONFIG_FILE, "preprocessor_config.json", "tokenizer.json", TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt",
)  # fmt: skip
ADAPTER_FILES = (LORA_WEIGHTS_FILE, LORA_CONFIG_FILE, PROJECTOR_FILE, VISION_FILE)
MERGED_FILES = (MODEL_CONFIG_FILE, "generation_config.json", "model.safetensors", "model.safetensors.index.json")
MERGED_SHARD = "model-*-of-*.safetensors"


@dataclass
class PushFile:
    path_in_repo: str
    content: Path | bytes  # a file to upload as it is, or generated (scrubbed) bytes

    @property
    def size(self) -> int:
        return len(self.content) if isinstance(self.content, bytes) else self.content.stat().st_size


@dataclass
class PushPlan:
    """What ``push`` uploads: the repo, its visibility, the branch and the exact files."""

    repo_id: str
    private: bool
    revision: str | None
    kind: str  # adapter | merged
    files: list[PushFile]
    run_dir: Path | None

    def describe(self) -> str:
        total = sum(f.size for f in self.files)
        lines = [
            f"repo: {self.repo_id} ({'private' if self.private else 'PUBLIC'}), revision: {self.revision or 'main'}, "
            f"{self.kind}",
            f"files ({len(self.files)}, {_size(total)}):",
        ]
        lines += [f"  {_size(f.size):>10}  {f.path_in_repo}" for f in sorted(self.files, key=lambda f: f.path_in_repo)]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def plan_push(
    ref: str, repo_id: str, merged: bool = False, public: bool = False, revision: str | None = None
) -> PushPlan:
    """The push of a run's adapter (or, ``merged``, its merged model), or of a merged directory."""

    from lora_llava.artifacts import open_artifact
    from lora_llava.errors import UserError
    from lora_llava.layout import RunDir, read_meta

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(
            f"repo id {repo_id!r} is not owner/name", hint="e.g. lora-llava push runs/x me/my-llava-adapter"
        )
    art = open_artifact(ref)
    run_dir = art.run_dir
    if merged and art.kind in ("run", "adapter"):
        folder = RunDir(run_dir).merged if run_dir else None
        if folder is None or not (folder / MODEL_CONFIG_FILE).is_file():
            raise UserError(
                f"{ref} has no merged model to push",
                hint=f"make one with: lora-llava merge {ref} {RunDir(run_dir or ref).merged}, then push again",
            )
        kind, lineage = "merged", open_artifact(folder).lineage()
    elif art.kind in ("merged", "aligned"):
        folder, kind, lineage = art.path, "merged", art.lineage()
    elif art.kind in ("run", "adapter"):
        folder, kind, lineage = art.adapter_dir, "adapter", art.lineage()
    else:
        raise UserError(f"{ref!r} is {art.description}; push takes a run directory, an adapter or a merged model")
    assert folder is not None
    run_dir = lineage.run_dir
    files = [PushFile(p.name, p) for p in _uploadable(folder, kind)]
    meta = read_meta(folder)
    generated: dict[str, bytes] = {}
    if meta is not None:
        generated[META_FILE] = json.dumps(scrub(meta.to_json()), indent=2).encode()
    recipe_text = ""
    if lineage.recipe is not None:
        recipe = load_yaml(lineage.recipe.read_text(encoding="utf-8"), f"recipe {lineage.recipe}")
        recipe_text = yaml.safe_dump(scrub(recipe), sort_keys=False)
        generated[RECIPE_FILE] = recipe_text.encode()
    run = RunDir(run_dir) if run_dir is not None else None
    if run is not None and run.metrics.is_file() and kind == "adapter":
        generated[run.metrics.name] = scrub(run.metrics.read_text()).encode()
    if (folder / MERGE_REPORT_FILE).is_file():
        generated[MERGE_REPORT_FILE] = json.dumps(
            scrub(json.loads((folder / MERGE_REPORT_FILE).read_text())), indent=2
        ).encode()
    facts = _card_facts(kind, repo_id, lineage, recipe_text)
    generated["README.md"] = render_card(facts).encode()
    if (folder / LORA_CONFIG_FILE).is_file():  # PEFT's pointer to the base: the Hub id, never a local path
        config = scrub(json.loads((folder / LORA_CONFIG_FILE).read_text()))
        config["base_model_name_or_path"] = facts.base_model or config.get("base_model_name_or_path")
        generated[LORA_CONFIG_FILE] = json.dumps(config, indent=2).encode()
    files = [f for f in files if f.path_in_repo not in generated]
    files += [PushFile(name, data) for name, data in generated.items()]
    return PushPlan(repo_id, not public, revision, kind, files, Path(run_dir) if run_dir else None)


def _uploadable(folder: Path, kind: str) -> list[Path]:
    """The files of ``folder`` a push of ``kind`` may upload: allow-listed names, each a regular file of the folder
    itself (a link, whatever it points at, is refused by name), merged shards exactly as the index lists them,
    every ``.safetensors`` a readable safetensors file and every ``.json`` JSON (a file that only carries the
    name is not uploaded as one)."""
    from lora_llava.errors import UserError

    names = [*(ADAPTER_FILES if kind == "adapter" else MERGED_FILES), *PROCESSOR_FILES]
    index = folder / "model.safetensors.index.json"
    shards: list[str] = []
    if kind == "merged" and index.is_file() and not index.is_symlink():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a weight index (no weight_map)", hint="merge again") from None
        bad = [n for n in shards if not isinstance(n, str) or "/" in n or not fnmatch.fnmatch(n, MERGED_SHARD)]
        if bad:
            raise UserError(f"{index} names files that are not shards of this folder: {', '.join(map(str, bad[:4]))}")
        names += shards
    present = [folder / n for n in dict.fromkeys(names) if (folder / n).exists() or (folder / n).is_symlink()]
    links = [p for p in present if p.is_symlink() or p.resolve().parent != folder.resolve()]
    if links:
        shown = ", ".join(f"{p.name} -> {os.readlink(p)}" if p.is_symlink() else p.name for p in links[:4])
        raise UserError(
            f"{folder} holds {shown}: a push uploads only regular files of the folder itself, never through a link",
            hint="replace the link(s) with the files themselves (cp -L), or remove them",
        )
    out = [p for p in present if p.is_file()]
    if kind == "merged" and index.is_file() and not index.is_symlink():
        absent = [n for n in shards if not (folder / n).is_file()]
        if absent:
            raise UserError(f"{folder} lacks shard(s) its index lists: {', '.join(absent[:4])}", hint="merge again")
    for p in out:
        problem = _not_what_it_is_named(p)
        if problem:
            raise UserError(
                f"{p} is {problem}; a push uploads it only as what its name says", hint="merge or train again"
            )
    return sorted(out)


def _not_what_it_is_named(path: Path) -> str | None:
    """Why ``path`` is not the kind of file its name says (a safetensors header, JSON), or None."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or n > min(path.stat().st_size - 8, 100 * 1024 * 1024):
                return "not a safetensors file (no header)"
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return "not a safetensors file (its header is not JSON)"
        return None if isinstance(header, dict) else "not a safetensors file"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "not JSON"
    return None


def _card_facts(kind: str, repo_id: str, lineage: Lineage, recipe_text: str) -> CardFacts:
    """What the card states: the model's lineage (``Artifact.lineage``, as the demo shows it) and its links."""
    from lora_llava.backbones.registry import model_class_name
    from lora_llava.layout import RunDir

    source = lineage.source or ""
    base_model = source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("builtin:") else None
    family = lineage.family if lineage.family is not None else "llava"
    facts = CardFacts(
        kind=kind,
        repo_id=repo_id,
        backbone=scrub(lineage.backbone or "unknown"),
        base_model=base_model,
        chat_format=lineage.chat_format or "",
        system_prompt=lineage.system_prompt or "",
        recipe_yaml=recipe_text.strip(),
        image_newline=family == "llava_next" and kind == "adapter",
        pad_to_square=lineage.pad_to_square,
        model_class=model_class_name(family),
        steps=lineage.steps,
        train_loss=lineage.train_loss,
        seconds=lineage.seconds,
        hardware=lineage.hardware or "",
        train_samples=lineage.train_samples,
        accuracy=dict(lineage.accuracy or {}),
        eval_samples=lineage.eval_samples,
        data_report=scrub(lineage.data_report) if lineage.data_report is not None else "",
        parity=_parity(lineage.merge),
    )
    if lineage.run_dir is not None:
        pushed = RunDir(lineage.run_dir).pushed
        if pushed.is_file():
            other = json.loads(pushed.read_text()).get("merged" if kind == "adapter" else "adapter")
            facts.other_repo = other if other != repo_id else None
    return facts


def _parity(merge: MergeCheck | None) -> dict[str, Any]:
    """The merge verification as the card's table reads it."""
    if merge is None:
        return {}
    return {
        "samples": merge.samples,
        "answers_equal": merge.answers_equal,
        "answers_total": merge.answers_total,
        "max_abs_logit_diff": merge.max_abs_logit_diff,
        "mean_max_abs_logit_diff": merge.mean_max_abs_logit_diff,
        "dtype": merge.run_dtype,
        "quantized_answers_equal": merge.quantized_answers_equal,
        "accuracy": dict(merge.accuracy),
        "no_op": merge.no_op,
        "passed": merge.passed,
    }


def hub_token() -> str:
    """The Hugging Face token from HF_TOKEN or the login cache; never from a recipe or a flag."""
    from huggingface_hub import get_token

    from lora_llava.errors import UserError

    token = get_token()
    if not token:
        raise UserError(
            "no Hugging Face token: pushing needs one",
            hint="log in once with `hf auth login` (the token is kept in the Hugging Face cache), or set HF_TOKEN "
            "in the environment",
        )
    return token


def push(plan: PushPlan, log: Log = print) -> str:
    """Upload ``plan`` (creating the repo, private unless the plan says public); returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from lora_llava.errors import UserError
    from lora_llava.hub import hub_reachable, offline_reason, unreachable

    if not hub_reachable():
        raise UserError(
            f"cannot reach the Hub to push {plan.repo_id} ({offline_reason()})",
            hint="push when online (unset HF_HUB_OFFLINE); --dry-run shows what would be uploaded",
        )
    api = HfApi(token=hub_token())
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        info = api.repo_info(plan.repo_id)
        if plan.private and not info.private:
            raise UserError(
                f"{plan.repo_id} exists and is public; this push was asked to be private",
                hint="pass --public to upload to a public repo, or choose another repo id",
            )
        if plan.revision:
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        ops = [CommitOperationAdd(f.path_in_repo, f.content if isinstance(f.content, bytes) else str(f.content))
               for f in plan.files]  # fmt: skip
        api.create_commit(
            plan.repo_id, operations=ops, revision=plan.revision,
            commit_message=f"lora_llava: push {plan.kind}",
        )  # fmt: skip
    except HfHubHTTPError as e:
        raise UserError(
            f"the Hub refused the push to {plan.repo_id}: {_status(e)}",
            hint="check the repo id and that the token may write to it",
        ) from None
    except Exception as e:
        if not unreachable(e):
            raise
        raise UserError(
            f"cannot reach the Hub to push {plan.repo_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="retry when online; a re-run uploads only what changed",
        ) from None
    if plan.run_dir is not None:
        from lora_llava.layout import RunDir

        pushed = RunDir(plan.run_dir).pushed
        record = json.loads(pushed.read_text()) if pushed.is_file() else {}
        record[plan.kind] = plan.repo_id
        pushed.write_text(json.dumps(record, indent=2))
        other_kind = "merged" if plan.kind == "adapter" else "adapter"
        other = record.get(other_kind)
        if other and other != plan.repo_id:  # its card now links back to this repo
            card = next(f for f in plan_push(str(plan.run_dir), other, merged=other_kind == "merged").files
                        if f.path_in_repo == "README.md")  # fmt: skip
            try:
                api.create_commit(other, operations=[CommitOperationAdd("README.md", card.content)],
                                  commit_message="lora_llava: link the card to " + plan.repo_id)  # fmt: skip
                log(f"updated the card of {other} to link to {plan.repo_id}")
            except Exception as e:
                if not (isinstance(e, HfHubHTTPError) or unreachable(e)):
                    raise
                log(f"warning: could not update the card of {other} ({_status(e)}); push it again to link it")
    link = str(url).rstrip("/") + (f"/tree/{plan.revision}" if plan.revision else "")
    return link


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else type(e).__name__
