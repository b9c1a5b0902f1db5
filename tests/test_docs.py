"""The documentation's command lines are ones the CLI accepts, and README's contents list matches docs/.

Every ``lora-llava ...`` command line in README.md, docs/*.md and examples/**/README.md is parsed with the
CLI's own argparse parser (``build_parser`` and ``_options_first``, as ``lora-llava`` itself does); nothing runs.

What counts as a command line:

- fenced blocks tagged bash/sh/shell/console/zsh: every line, after a ``$ `` prompt if there is one;
- other fenced blocks (program output, YAML, Python): only lines with a ``$ `` prompt, so that output such as
  ``lora-llava chat: adapter runs/...`` or ``resume with: lora-llava train ...`` is not taken for a command;
- a line ending in ``\\`` is joined with the next;
- inline code spans (outside fenced blocks) holding ``lora-llava `` (``lora-llava plan ...``, also
  ``echo ... | lora-llava chat ...``) — except spans that use placeholder syntax (``[..]``, ``(..)``, ``<..>``,
  ``...``, a table's escaped ``\\|``), as the Commands table's synopses do (``lora-llava eval MODEL [--data F
  ...]``), and spans that name a verb alone, at most two lowercase words (``lora-llava eval``,
  ``lora-llava data generate``): those name the verb, they are not commands.

Shell parts are stripped before parsing: ``# comments``, ``NAME=value`` assignments before the command,
``&&``/``||``/``;``/``|``/``&`` chains (each ``lora-llava`` part is parsed, the rest ignored), redirections
(``>``, ``>>``, ``<``, ``2>&1``, with their targets). ``--help``/``-h`` is dropped (argparse would exit on it).
Placeholders in capitals (``RECIPE``, ``RUN``) parse as positionals and are fine.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_llava.cli.main import _options_first, build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "ARCHITECTURE.md"  # written by another change; linked from README before it exists

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
CHAIN = {"&&", "||", ";", "|", "&"}
REDIRECT = {">", ">>", "<", "<<", ">&", "&>", "&>>", ">|", "<>"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"[\[\]()<>]|\\\||\.\.\.|…")  # a pipe between words is a pipe; \| is a table's "or"
VERB_NAME = re.compile(r"^lora-llava( [a-z]+){1,2}$")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class CommandLine:
    where: str  # file:line
    text: str  # the line as written
    argv: list[str]  # the arguments after ``lora-llava``
    inline: bool


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md")), *sorted((REPO / "examples").glob("**/README.md"))]


def lora_llava_argvs(line: str) -> list[list[str]]:
    """The ``lora-llava`` commands of one shell line, each as the argv after ``lora-llava``."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)  # comments dropped; operators are tokens of their own
    segments: list[list[str]] = [[]]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in CHAIN:
            segments.append([])
        elif tok in REDIRECT:
            if segments[-1] and segments[-1][-1].isdigit():  # 2>file, 2>&1: the descriptor
                segments[-1].pop()
            i += 1  # the target
        else:
            segments[-1].append(tok)
        i += 1
    argvs = []
    for seg in segments:
        while seg and ASSIGNMENT.match(seg[0]):  # WANDB_MODE=offline lora-llava ...
            seg = seg[1:]
        if seg and seg[0] == "lora-llava":
            argvs.append(seg[1:])
    return argvs


def command_lines(text: str, where: str) -> list[CommandLine]:
    """Every lora-llava command line of one markdown text (see the module docstring for the rules)."""
    found: list[CommandLine] = []
    prose: list[str] = []  # the text outside fenced blocks, fenced lines blanked (line numbers kept)
    lang: str | None = None  # the open fence's language; None outside a fenced block
    pending = ""
    for number, raw in enumerate(text.split("\n"), 1):
        fence = FENCE.match(raw)
        if fence:
            lang = None if lang is not None else fence.group(2).lower()
            prose.append("")
            continue
        if lang is None:
            prose.append(raw)
            continue
        prose.append("")
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        prompted = line.startswith("$ ")
        if prompted:
            line = line[2:]
        elif lang not in SHELL_LANGS:
            continue  # program output: only prompted lines are commands
        if "lora-llava" not in line:
            continue
        found += [CommandLine(f"{where}:{number}", line, argv, False) for argv in lora_llava_argvs(line)]
    joined = "\n".join(prose)
    for span in INLINE.finditer(joined):
        code = " ".join(span.group(1).split())
        if "lora-llava " not in code or PLACEHOLDER.search(code) or VERB_NAME.match(code):
            continue
        number = joined.count("\n", 0, span.start()) + 1
        found += [CommandLine(f"{where}:{number}", code, argv, True) for argv in lora_llava_argvs(code)]
    return found


def all_command_lines() -> list[CommandLine]:
    found: list[CommandLine] = []
    for path in doc_files():
        found += command_lines(path.read_text(), str(path.relative_to(REPO)))
    return found


def parse_error(argv: list[str]) -> str | None:
    """None when ``lora-llava ARGV`` parses with the CLI's own parser, else argparse's message."""
    argv = [a for a in argv if a not in ("-h", "--help")]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser = build_parser()
            args = parser.parse_args(_options_first(parser, argv))
    except SystemExit as e:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {e.code}"
    if getattr(args, "verb", None) is None:
        return "no verb"
    return None


def test_enough_command_lines_are_found():
    lines = all_command_lines()
    assert len(lines) >= 30, [c.text for c in lines]
    assert sum(not c.inline for c in lines) >= 30  # the fenced blocks alone
    assert {c.where.split(":")[0] for c in lines} >= {"README.md", "docs/data.md", "docs/try-it.md"}


def test_every_command_line_parses():
    failures = [f"{c.where}: {c.text}\n    {err}" for c in all_command_lines() if (err := parse_error(c.argv))]
    assert not failures, "command lines the CLI rejects:\n" + "\n".join(failures)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "quickstart", "--no-such-flag"],
        ["quickstart", "--no-such-flag"],
        ["no-such-verb"],
        ["eval"],  # MODEL missing
        ["merge", "runs/x"],  # OUT_DIR missing
        ["push", "runs/x", "me/x", "--dry-run", "--privat"],
        ["data", "generate", "x.yaml", "--limits", "3"],
        [],
    ],
)
def test_the_parse_check_rejects_mistakes(argv):
    assert parse_error(argv) is not None


def test_the_extraction_strips_shell_parts():
    text = "\n".join(
        [
            "```bash",
            "WANDB_MODE=offline lora-llava train my.yaml train.max_steps=5   # a comment",
            "pip install -e . && lora-llava quickstart --overwrite > out.txt 2>&1",
            'echo "hi" | lora-llava chat runs/x --image a.png',
            "lora-llava predict runs/x --data d.json \\",
            "    --out p.jsonl --reference",
            "python -m pytest",
            "```",
            "```",
            "lora-llava chat: adapter runs/x/adapter (output, not a command)",
            "$ lora-llava plan quickstart --gpu-memory 24GB",
            "```",
            "Inline: `lora-llava recipes --backbones`, `lora-llava eval`, `lora-llava plot RUN [--out F]`,",
            "`echo hi | lora-llava chat runs/x`, `lora-llava recipes [show\\|copy NAME]`, `lora-llava` alone.",
        ]
    )
    got = [c.argv for c in command_lines(text, "x.md")]
    assert got == [
        ["train", "my.yaml", "train.max_steps=5"],
        ["quickstart", "--overwrite"],
        ["chat", "runs/x", "--image", "a.png"],
        ["predict", "runs/x", "--data", "d.json", "--out", "p.jsonl", "--reference"],
        ["plan", "quickstart", "--gpu-memory", "24GB"],
        ["recipes", "--backbones"],
        ["chat", "runs/x"],
    ]
    assert all(parse_error(argv) is None for argv in got)


def readme_doc_links() -> set[str]:
    readme = (REPO / "README.md").read_text()
    return {m.split("#")[0] for m in LINK.findall(readme) if m.startswith("docs/")}


def test_readme_lists_every_docs_page():
    linked = readme_doc_links()
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages - linked == set(), "docs pages README does not link"
    for link in linked:
        if link == "docs/ARCHITECTURE.md" and not ARCHITECTURE.exists():
            continue  # another change writes it
        assert (REPO / link).is_file(), f"README links {link}, which does not exist"
    assert "docs/ARCHITECTURE.md" in linked


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    text = path.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if dest == ARCHITECTURE and not dest.exists():
            continue
        assert dest.exists(), f"{path.relative_to(REPO)} links {target}: no such file"
        if anchor and dest.suffix == ".md":
            headings = [slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)]
            assert anchor in headings, f"{path.relative_to(REPO)} links {target}: no such heading"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md") if p.name != "ARCHITECTURE.md"))
def test_docs_page_opens_with_a_summary_and_its_command(page):
    lines = (DOCS / page).read_text().split("\n")
    assert lines[0].startswith("# "), "a title first"
    assert lines[1] == "" and lines[2] and not lines[2].startswith(("#", "`")) and lines[3] == "", (
        "then a one-line summary"
    )
    assert lines[4] == "```bash", "then the command it is about, in a fenced bash block"
    block = lines[5 : lines.index("```", 5)]
    assert any(lora_llava_argvs(line) or line.startswith("python ") for line in block)


def test_readme_is_short_and_keeps_the_ci_test_command():
    # .ci/run takes the first line starting `pip install` after the line `Run the tests:` and runs it verbatim
    lines = (REPO / "README.md").read_text().split("\n")
    after = lines[lines.index("Run the tests:") :]
    command = next(line for line in after if line.startswith("pip install"))
    assert command == 'pip install -c constraints.txt torch==2.13.0 -e ".[test]" && python -m pytest'
    assert len(lines) <= 200
