"""The ``cdalign`` console command as a user runs it (``python -m cdalign``, the same entry
point as the installed ``cdalign`` script): the help of the command and of each subcommand,
one error line and exit 2 for a bad subcommand or recipe name, tiny runs of ``cdalign align``
and ``cdalign evaluate``; the packaged recipes found by name and by the checkout path they
had; every recipe, suite or script path the repository's files mention exists."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cdalign import cli
from cdalign.recipes_data import RECIPES_DIR, find_recipe, packaged_recipes

ROOT = Path(__file__).resolve().parents[1]
# A run small enough for seconds on a CPU (tests/test_docs.py's TINY_ALIGN_FLAGS).
TINY_ALIGN = ["--max_steps", "1", "--eval_batches", "1", "--num_grid_images", "0", "--normalization_batches", "1",
              "--num_inference_steps", "3", "--backprop_steps", "1", "--global_batch_size", "2"]
TINY_EVALUATE = ["--num_prompts", "2", "--num_inference_steps", "3", "--batch_size", "2", "--grid_images", "0",
                 "--rewards", "brightness,colorfulness", "--no_cache"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def cdalign(*args, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``cdalign ARGS`` in its own process (``python -m cdalign``)."""
    return subprocess.run([sys.executable, "-m", "cdalign", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- the registry
def test_the_console_script_is_the_dispatcher():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"] == {"cdalign": "cdalign.cli:main"}


def test_subcommands_are_a_registry_of_command_objects():
    assert list(cli.COMMANDS) == ["align", "compose", "evaluate", "hub", "demo"]
    for name, command in cli.COMMANDS.items():
        assert isinstance(command, cli.Command) and command.name == name and command.summary


def test_unknown_command_names_it_and_the_commands(capsys):
    assert cli.main(["algin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'algin'" in err and "did you mean 'align'" in err
    assert all(name in err for name in cli.COMMANDS)


# ----------------------------------------------------------------------------- help and bad input
@pytest.fixture(scope="module")
def helps():
    """``cdalign --help`` and each subcommand's ``--help``, two processes at a time."""
    argvs = [["--help"]] + [[name, "--help"] for name in cli.COMMANDS] + [["hub", "push", "--help"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(map(tuple, argvs), pool.map(lambda a: cdalign(*a), argvs)))


def test_help_lists_every_subcommand(helps):
    done = helps[("--help",)]
    assert done.returncode == 0, done.stderr
    for name, command in cli.COMMANDS.items():
        assert re.search(rf"^  {name}\s+{re.escape(command.summary)}$", done.stdout, re.M)


@pytest.mark.parametrize("name, expected", [
    ("align", ["usage: cdalign align", "--max_steps", "default: tiny/multi_reward"]),
    ("compose", ["usage: cdalign compose", "--dual.lr", "tiny_adapters.yaml"]),
    ("evaluate", ["usage: cdalign evaluate", "--checkpoint NAME=SOURCE[@REVISION]", "--suite"]),
    ("hub", ["usage: cdalign hub", "push", "pull", "publish-embedded"]),
])
def test_each_subcommand_has_its_help(helps, name, expected):
    done = helps[(name, "--help")]
    assert done.returncode == 0, done.stderr[-3000:]
    text = " ".join(done.stdout.split()).replace("cdalign/recipes_data/tiny/multi_reward.yaml", "tiny/multi_reward")
    assert [e for e in expected if e not in text] == []
    _no_traceback(done)


def test_hub_push_help_names_the_command(helps):
    done = helps[("hub", "push", "--help")]
    assert done.returncode == 0 and "usage: cdalign hub push" in done.stdout and "--repo_id" in done.stdout


def test_demo_help_or_the_extra_it_needs(helps):
    done = helps[("demo", "--help")]
    if importlib.util.find_spec("gradio") is None:
        assert done.returncode == 2 and "pip install 'cdalign[demo]'" in done.stderr
    else:
        assert done.returncode == 0 and "usage: cdalign demo" in done.stdout and "--runs_dir" in done.stdout
    _no_traceback(done)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Bad input to the console command: name -> (argv, expected in the one error line)."""
    tmp = tmp_path_factory.mktemp("refusals")
    cases = {
        "no such command": (["algin"], ["unknown command 'algin'", "align, compose, evaluate, hub, demo"]),
        "no command": ([], ["usage: cdalign <command>"]),
        "no such recipe": (["align", "--config", "tiny/multi_rewards"],
                           ["tiny/multi_rewards: config file not found", "tiny/multi_reward,", "compose/tiny_adapters"]),
        "no such composition recipe": (["compose", "--config", "compose/tiny_adapter"],
                                       ["compose/tiny_adapter: config file not found", "compose/tiny_adapters"]),
        "no such suite": (["evaluate", "--suite", "tiniest", "--output_dir", tmp / "eval"],
                          ["evaluation suite 'tiniest'", "known suites:", "tiny"]),
        "misspelt flag": (["align", "--max_step", "3"], ["--max_step: unknown option; did you mean --max_steps"]),
        "hub: no such action": (["hub", "pusj"], ["invalid choice: 'pusj'", "see cdalign hub --help"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(cases, pool.map(lambda c: cdalign(*cases[c][0], cwd=tmp), cases)))
    return {name: (cases[name][1], done[name]) for name in cases}


@pytest.mark.parametrize("name", ["no such command", "no command", "no such recipe", "no such composition recipe",
                                  "no such suite", "misspelt flag", "hub: no such action"])
def test_bad_input_is_one_error_line_and_exit_2(refusals, name):
    expected, done = refusals[name]
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    _no_traceback(done)
    assert [e for e in expected if e not in done.stderr] == [], done.stderr
    if name != "no command":  # that one prints the usage
        assert done.stderr.count("error:") == 1 and done.stderr.strip().count("\n") == 0, done.stderr


# ----------------------------------------------------------------------------- recipes by name
def test_packaged_recipes_are_found_by_name_and_by_their_old_checkout_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a checkout: nothing relative to the current folder
    assert {"tiny/multi_reward", "tiny/policy_gradient", "tiny/flow_multi_reward", "compose/tiny_adapters",
            "compose/tiny_mixture", "suites/tiny"} <= set(packaged_recipes())
    multi = RECIPES_DIR / "tiny" / "multi_reward.yaml"
    assert find_recipe("tiny/multi_reward") == find_recipe("tiny/multi_reward.yaml") == multi
    assert find_recipe("recipes/tiny/multi_reward.yaml") == multi
    assert find_recipe("recipes/compose/tiny_adapters.yaml") == RECIPES_DIR / "compose" / "tiny_adapters.yaml"
    assert find_recipe("evaluation/suites/tiny.yaml") == RECIPES_DIR / "suites" / "tiny.yaml"
    (tmp_path / "recipes" / "tiny").mkdir(parents=True)
    (tmp_path / "recipes" / "tiny" / "multi_reward.yaml").write_text("max_steps: 3\n")
    assert find_recipe("recipes/tiny/multi_reward.yaml") == Path("recipes/tiny/multi_reward.yaml")  # a file wins
    with pytest.raises(ValueError, match=r"no/such: config file not found.*packaged: .*tiny/multi_reward"):
        find_recipe("no/such")
    with pytest.raises(ValueError, match="config file not found"):
        find_recipe("../cdalign/recipes_data/tiny/multi_reward")  # names stay inside the package


# Recipe and suite files the repository's files mention: each must exist (a moved recipe
# leaves no stale mention), or be named by --config as a packaged recipe.
MENTIONED = re.compile(r"(?<![\w./-])((?:recipes|evaluation|demo|benchmarks|cdalign/recipes_data)/[\w./-]*\w\.ya?ml)")
MENTIONED_BY_NAME = re.compile(r"--config[ =]((?:tiny|compose|suites)/\w+)(?![\w./])")
# Where a recipe's old checkout path is named on purpose: the mapping, and the tests of it.
OLD_PATHS_NAMED_IN = {"cdalign/recipes_data/__init__.py", "cdalign/evaluation/suite.py", "tests/test_evaluation.py",
                      "tests/test_console.py"}


def _mentioning_files() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for folder in ("tests", "recipes", "benchmarks", "evaluation", "demo", "cdalign"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md") and p.is_file()]
    return files


def test_every_mentioned_recipe_or_suite_exists():
    stale = []
    for path in _mentioning_files():
        where = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for mention in set(MENTIONED.findall(text)):
            if re.search(r"[A-Z<*]", mention) or (ROOT / mention).exists():  # a placeholder (NAME.yaml), or there
                continue
            if where not in OLD_PATHS_NAMED_IN:
                stale.append(f"{where}: {mention}")
            else:
                find_recipe(mention)  # an old checkout path: still found
        for name in set(MENTIONED_BY_NAME.findall(text)):
            try:
                find_recipe(name)
            except ValueError:
                stale.append(f"{where}: --config {name}")
    assert stale == [], "mentions of recipes that do not exist:\n" + "\n".join(sorted(stale))


# ----------------------------------------------------------------------------- tiny runs
@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """``cdalign align`` (the default recipe, tiny/multi_reward) at tiny size."""
    tmp = tmp_path_factory.mktemp("console-align")
    done = cdalign("align", *TINY_ALIGN, "--output_dir", tmp / "run", cwd=tmp)
    return tmp / "run", done


def test_align_runs_the_default_recipe(aligned):
    run, done = aligned
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out evaluation: 2 images" in done.stdout and "colorfulness_high" in done.stdout
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "report.json").is_file()
    assert "max_steps: 1" in (run / "config.yaml").read_text()


def test_evaluate_scores_the_run_with_the_packaged_suite(aligned, tmp_path):
    run, _ = aligned
    done = cdalign("evaluate", *TINY_EVALUATE, "--checkpoint", f"aligned={run}", "--output_dir", tmp_path / "eval",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# Evaluation: tiny" in done.stdout and re.search(r"^\| aligned \|", done.stdout, re.M)
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {"evaluation.json", "evaluation.md"}
