"""The documentation (README.md and docs/**/*.md) as a specification: the generated
configuration reference is current, every relative link and image resolves, every code block
parses, and the blocks marked ``runnable`` run as written.

Code blocks carry their kind in the info string (docs/index.md, "Code blocks in these pages"):
``python runnable`` / ``bash runnable`` are executed here at tiny size (Python blocks with the
sampler and batch sizes made small through ``cdalign.load_config_file``; ``cdalign align`` and
``recipes/align.py`` commands with ``TINY_ALIGN_FLAGS`` appended; ``cdalign`` is ``python -m
cdalign`` where the console script is not installed); ``slow``, ``gpu``, ``hub`` and ``install`` blocks are
only parsed (``ast.parse``, ``bash -n``); ``yaml`` blocks are loaded. Runnable blocks run in a
temporary folder that mirrors the repository root, so their relative outputs never land in it."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TAGS = {"runnable", "slow", "gpu", "hub", "install"}
CHECKED_LANGUAGES = {"python", "bash"}
# Sizes small enough for seconds on a CPU; the block's own flags stay (these come after them).
TINY_ALIGN_FLAGS = "--max_steps 1 --eval_batches 1 --num_grid_images 0 --normalization_batches 1 " \
                   "--num_inference_steps 3 --backprop_steps 1 --global_batch_size 2"
OPTIONAL_MODULES = {"evaluate", "gradio", "gradio_client"}  # the extras a block may need


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    tags: tuple[str, ...]
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file: language and tags from the info string."""
    blocks, lines = [], path.read_text(encoding="utf-8").split("\n")
    opening = None  # (line number, fence, info)
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        match = re.match(r"^\s*(`{3,}|~{3,})\s*(.*)$", line)
        if opening is None and match:
            opening, body = (number, match.group(1), match.group(2).split()), []
        elif opening is not None and match and match.group(1).startswith(opening[1]) and not match.group(2):
            info = opening[2]
            blocks.append(Block(path, opening[0], info[0] if info else "", tuple(info[1:]), "\n".join(body) + "\n"))
            opening = None
        elif opening is not None:
            body.append(line)
    assert opening is None, f"{path.relative_to(ROOT)}:{opening[0]}: a code fence is never closed"
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in code_blocks(path)]


def blocks_of(language: str, tag: str | None = None) -> list:
    chosen = [b for b in ALL_BLOCKS if b.language == language and (tag is None or tag in b.tags)]
    return [pytest.param(b, id=b.id) for b in chosen]


# ----------------------------------------------------------------------------- the generated reference
def test_config_reference_is_what_the_generator_writes():
    """docs/reference/config.md is generated from the config fields' help; a field changed in code
    without rerunning ``python docs/gen_config_reference.py`` fails here. A fresh interpreter, so
    that entries other tests register do not leak into the choices."""
    out = subprocess.run([sys.executable, "docs/gen_config_reference.py", "--stdout"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    committed = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    assert committed == out.stdout, "docs/reference/config.md is stale: run python docs/gen_config_reference.py"


def test_registries_and_rewards_pages_list_every_entry():
    """docs/reference/registries.md names every entry of every registry it lists (and no other),
    and docs/reference/rewards.md names every registered reward."""
    rows = re.findall(r"^\| `(\w+)` \| `([\w.]+)` \| [^\n]*\| ([^|\n]+) \|$",
                      (ROOT / "docs" / "reference" / "registries.md").read_text(encoding="utf-8"), re.M)
    assert len(rows) >= 10
    script = (
        "import importlib, json, sys, cdalign\n"
        "rows = json.loads(sys.argv[1])\n"
        "print(json.dumps({name: list(getattr(importlib.import_module(module), name).names()) for name, module in rows}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, json.dumps([[n, m] for n, m, _ in rows])], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    actual = json.loads(out.stdout)
    for name, _, entries in rows:
        assert sorted(re.findall(r"`([^`]+)`", entries)) == sorted(actual[name]), f"registries.md, row {name}"
    rewards_page = (ROOT / "docs" / "reference" / "rewards.md").read_text(encoding="utf-8")
    assert [r for r in actual["REWARDS"] if f"`{r}`" not in rewards_page] == []


# ----------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return "".join(c for c in text.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors of a file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    fenced = {n for b in code_blocks(path) for n in range(b.line, b.line + b.code.count("\n") + 2)}
    anchors, repeats = set(), {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and number not in fenced:
            slug = _slug(match.group(1))
            anchors.add(f"{slug}-{repeats[slug]}" if slug in repeats else slug)
            repeats[slug] = repeats.get(slug, 0) + 1
    return anchors


def _prose(path: Path) -> str:
    """The file without its fenced blocks and inline code (links there are not links)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    fenced = {n for b in code_blocks(path) for n in range(b.line, b.line + b.code.count("\n") + 2)}
    text = "\n".join(line for number, line in enumerate(lines, start=1) if number not in fenced)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_every_relative_link_and_image_resolves(path):
    """Each relative link or image points at a file that exists; an anchor, at a heading there."""
    broken = []
    for target in re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert broken == [], f"{path.relative_to(ROOT)}: " + "; ".join(broken)


# ----------------------------------------------------------------------------- code blocks
def test_every_python_and_bash_block_says_how_it_is_checked():
    untagged = [b.id for b in ALL_BLOCKS if b.language in CHECKED_LANGUAGES and len(set(b.tags) & TAGS) != 1]
    unknown = [f"{b.id} {t}" for b in ALL_BLOCKS if b.language in CHECKED_LANGUAGES for t in b.tags if t not in TAGS]
    assert untagged == [] and unknown == [], f"tag each block with one of {sorted(TAGS)}: {untagged + unknown}"


@pytest.mark.parametrize("block", blocks_of("python"))
def test_python_block_parses(block):
    ast.parse(block.code, filename=block.id)


@pytest.mark.parametrize("block", blocks_of("bash"))
def test_bash_block_parses(block):
    out = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{block.id}: {out.stderr}"


@pytest.mark.parametrize("block", blocks_of("yaml"))
def test_yaml_block_loads(block):
    assert isinstance(yaml.safe_load(block.code), dict)


def test_readme_test_command_is_what_ci_runs():
    """CI (.ci/run) runs `make test`; the README shows that command and what it runs, and the
    Makefile's `test` target runs exactly that."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test          # = HF_HUB_OFFLINE=1 python -m pytest -q" in readme
    assert re.search(r"^make test PYTHON=python$", (ROOT / ".ci" / "run").read_text(encoding="utf-8"), re.M)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^test:\n\t(.*)$", makefile, re.M).group(1)
    assert recipe.replace("$(PYTHON)", "python") == "HF_HUB_OFFLINE=1 python -m pytest -q"


# ----------------------------------------------------------------------------- runnable blocks
def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A folder whose entries link to the repository's (recipes/, metrics/, ...) but whose
    outputs/ is its own: blocks run from it as from the repository root."""
    folder = tmp_path_factory.mktemp("docs-root")
    for entry in ROOT.iterdir():
        if entry.name not in {"outputs", ".git", ".venv"}:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def python_runs(mirror):
    """Each distinct runnable Python block, executed once (the README's quick start is also in
    docs/quickstart.md): code -> (namespace, None) or (None, reason to skip)."""
    import cdalign

    real_load = cdalign.load_config_file

    def small(path):  # the recipe's problem and model; a few tiny batches instead of minutes
        cfg = real_load(path)
        cfg.num_inference_steps, cfg.backprop_steps = 3, 1
        cfg.train_batch_size, cfg.normalization_batches, cfg.eval_batches, cfg.num_grid_images = 2, 1, 1, 2
        cfg.global_batch_size = None  # train_batch_size per process
        cfg.normalization_cache_dir = str(mirror / "norm-cache")
        return cfg

    runs: dict[str, tuple] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cdalign, "load_config_file", small)
        patch.setenv("CDALIGN_CACHE", str(mirror / "cache"))
        patch.chdir(mirror)
        for block in (b for b in ALL_BLOCKS if b.language == "python" and "runnable" in b.tags):
            if block.code in runs:
                continue
            namespace: dict = {"__name__": "__docs__"}
            try:
                exec(compile(block.code, block.id, "exec"), namespace)
                runs[block.code] = (namespace, None)
            except ModuleNotFoundError as err:
                if err.name not in OPTIONAL_MODULES:
                    raise
                runs[block.code] = (None, f"{block.id} needs {err.name} (an optional extra)")
    return runs


@pytest.mark.parametrize("block", blocks_of("python", "runnable"))
def test_runnable_python_block_runs_as_written(block, python_runs):
    namespace, skip = python_runs[block.code]
    if skip:
        pytest.skip(skip)
    assert namespace is not None


def test_readme_quick_start_trains_two_steps_and_saves_the_lora(python_runs, mirror):
    """The README's Python quick start, run as written (sizes made small): its own settings hold,
    it trains, evaluates both constraints of the recipe, and saves the LoRA."""
    (quick_start,) = [b for b in ALL_BLOCKS if b.path.name == "README.md" and b.language == "python"]
    namespace, _ = python_runs[quick_start.code]
    assert namespace["config"].max_steps == 2  # the snippet's own setting
    assert namespace["trainer"].global_step == 2
    assert {c["name"] for c in namespace["report"]["constraints"]} == {"colorfulness_high", "brightness_high"}
    assert (mirror / "my-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (mirror / "outputs" / "library-run" / "report.json").is_file()


ALIGN_COMMAND = re.compile(r"recipes/align\.py|\bcdalign align\b")
# The console script `pip install` puts on the PATH; from a checkout that is not installed, the same
# entry point by its module.
CDALIGN_ON_PATH = 'command -v cdalign >/dev/null || cdalign() { python -m cdalign "$@"; }\n'


def _tiny(command: str) -> str:
    """Each ``cdalign align`` / ``recipes/align.py`` command of a block with ``TINY_ALIGN_FLAGS``
    appended (before a trailing comment), unless it asks for ``--help``."""
    lines = []
    for line in command.replace("\\\n", " ").split("\n"):
        code, hash_, comment = line.partition(" # ")
        if ALIGN_COMMAND.search(code) and "--help" not in code:
            code = f"{code.rstrip()} {TINY_ALIGN_FLAGS}"
        lines.append(code + hash_ + comment)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def bash_runs(mirror):
    """Each distinct runnable bash block (made tiny), run once from the mirror: code -> (script, result)."""
    runs: dict[str, tuple] = {}
    for block in (b for b in ALL_BLOCKS if b.language == "bash" and "runnable" in b.tags):
        if block.code not in runs:
            script = "set -euo pipefail\n" + CDALIGN_ON_PATH + _tiny(block.code)
            runs[block.code] = (script, subprocess.run(["bash", "-c", script], cwd=mirror, capture_output=True, text=True,
                                                       env=_env(CDALIGN_CACHE=str(mirror / "cache")), timeout=300))
    return runs


@pytest.mark.parametrize("block", blocks_of("bash", "runnable"))
def test_runnable_bash_block_runs_as_written(block, bash_runs):
    script, out = bash_runs[block.code]
    assert out.returncode == 0, f"{block.id}:\n{script}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
