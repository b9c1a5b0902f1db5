"""Publishing adapters and merged models to the Hugging Face Hub, with a model card.

Usage::

    plan = plan_push("runs/x", "me/my-adapter")     # private; the allow-listed files; the card
    print(plan.describe()); url = push(plan)        # the token from HF_TOKEN or the login cache, never printed
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_llava.annotations import Log
from lora_llava.card import CardFacts, render_card, scrub

# what a pushed repo may hold: weights as safetensors, configs, the processor; never optimizer, scheduler
# or RNG state, pickles, or checkpoints
PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt",
)  # fmt: skip
ADAPTER_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "projector.safetensors",
    "vision_tower.safetensors",
)
MERGED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
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
    import fnmatch

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
        if folder is None or not (folder / "config.json").is_file():
            raise UserError(
                f"{ref} has no merged model to push",
                hint=f"make one with: lora-llava merge {ref} {RunDir(run_dir or ref).merged}, then push again",
            )
        kind = "merged"
    elif art.kind in ("merged", "aligned"):
        folder, kind = art.path, "merged"
        parent = art.path.parent if art.path else None
        run_dir = parent if parent is not None and (parent / "adapter").is_dir() else run_dir
    elif art.kind in ("run", "adapter"):
        folder, kind = art.adapter_dir, "adapter"
    else:
        raise UserError(f"{ref!r} is {art.description}; push takes a run directory, an adapter or a merged model")
    assert folder is not None
    allowed = (*(ADAPTER_FILES if kind == "adapter" else MERGED_FILES), *PROCESSOR_FILES)
    files = [
        PushFile(p.name, p)
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.name in allowed or (kind == "merged" and fnmatch.fnmatch(p.name, MERGED_SHARD)))
    ]
    meta = read_meta(folder)
    generated: dict[str, bytes] = {}
    if meta is not None:
        generated["lora_llava.json"] = json.dumps(scrub(meta.to_json()), indent=2).encode()
    recipe_path = folder / "recipe.yaml" if (folder / "recipe.yaml").is_file() else None
    if recipe_path is None and run_dir is not None and (Path(run_dir) / "recipe.yaml").is_file():
        recipe_path = Path(run_dir) / "recipe.yaml"
    recipe_text = ""
    if recipe_path is not None:
        recipe_text = yaml.safe_dump(scrub(yaml.safe_load(recipe_path.read_text())), sort_keys=False)
        generated["recipe.yaml"] = recipe_text.encode()
    run = RunDir(run_dir) if run_dir is not None else None
    if run is not None and run.metrics.is_file() and kind == "adapter":
        generated["metrics.jsonl"] = scrub(run.metrics.read_text()).encode()
    if (folder / "merge_report.json").is_file():
        generated["merge_report.json"] = json.dumps(
            scrub(json.loads((folder / "merge_report.json").read_text())), indent=2
        ).encode()
    facts = _card_facts(kind, repo_id, folder, meta, run, recipe_text)
    generated["README.md"] = render_card(facts).encode()
    files += [PushFile(name, data) for name, data in generated.items()]
    return PushPlan(repo_id, not public, revision, kind, files, Path(run_dir) if run_dir else None)


def _card_facts(kind: str, repo_id: str, folder: Path, meta: Any, run: Any, recipe_text: str) -> CardFacts:
    from lora_llava.backbones.registry import model_class_name
    from lora_llava.layout import AdapterMeta

    source = getattr(meta, "source", "") or ""
    base_model = source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("builtin:") else None
    adapter_meta = meta if isinstance(meta, AdapterMeta) else None
    if adapter_meta is None and run is not None:
        from lora_llava.layout import read_meta

        found = read_meta(run.adapter) if run.adapter.is_dir() else None
        adapter_meta = found if isinstance(found, AdapterMeta) else None
    family = getattr(meta, "family", "llava")
    facts = CardFacts(
        kind=kind,
        repo_id=repo_id,
        backbone=scrub(getattr(meta, "backbone", "") or "unknown"),
        base_model=base_model,
        chat_format=getattr(meta, "chat_format", "") or "",
        system_prompt=getattr(meta, "system_prompt", "") or "",
        recipe_yaml=recipe_text.strip(),
        image_newline=family == "llava_next" and kind == "adapter",
        pad_to_square=bool(getattr(meta, "pad_to_square", False)),
        model_class=model_class_name(family),
    )
    if adapter_meta is not None:
        facts.steps, facts.train_loss = adapter_meta.steps, adapter_meta.train_loss
        facts.seconds, facts.hardware = adapter_meta.seconds, adapter_meta.hardware
        facts.train_samples = adapter_meta.train_samples
    if run is not None:
        if run.data_report.is_file():
            facts.data_report = scrub(run.data_report.read_text()).strip()
        if run.summary.is_file():
            summary = json.loads(run.summary.read_text())
            facts.accuracy = dict(summary.get("accuracy") or {})
            facts.eval_samples = summary.get("eval_samples")
        if run.pushed.is_file():
            other = json.loads(run.pushed.read_text()).get("merged" if kind == "adapter" else "adapter")
            facts.other_repo = other if other != repo_id else None
    report = folder / "merge_report.json"
    if not report.is_file() and run is not None:
        report = run.merged / "merge_report.json"  # an adapter's card shows how its merge verified
    if report.is_file():
        facts.parity = dict(json.loads(report.read_text()).get("parity") or {})
    return facts


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
    except OSError as e:
        raise UserError(
            f"cannot reach the Hub to push {plan.repo_id}: {e}",
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
            except (HfHubHTTPError, OSError) as e:
                log(f"warning: could not update the card of {other} ({_status(e)}); push it again to link it")
    link = str(url).rstrip("/") + (f"/tree/{plan.revision}" if plan.revision else "")
    return link


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else type(e).__name__
