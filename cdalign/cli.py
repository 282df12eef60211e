"""The ``cdalign`` console command (``[project.scripts]``; also ``python -m cdalign`` and
``accelerate launch -m cdalign``): one entry point, one subcommand per job.

    cdalign align    [--config tiny/multi_reward] [--field value ...]   # constrained alignment
    cdalign compose  [--config compose/tiny_adapters] [...]             # constrained composition
    cdalign evaluate [--suite tiny] [--checkpoint NAME=SOURCE ...]      # score checkpoints on one footing
    cdalign hub push|pull|publish-embedded ...                          # the Hugging Face Hub
    cdalign demo     [--runs_dir outputs]                               # the browser demo (the demo extra)

Each subcommand takes the flags and YAML recipes of the script it replaces (``recipes/align.py``,
``recipes/compose.py``, ``evaluation/evaluate.py``, ``python -m cdalign.hub``, ``demo/app.py``),
which stay as thin wrappers of the same code. Subcommands are entries of :data:`COMMANDS`
(name -> :class:`Command`); a command's module is imported when it runs, so ``cdalign --help``
and an optional extra that is not installed (gradio for ``demo``) cost nothing elsewhere."""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "main"]

PROG = "cdalign"


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module`` holds ``main(argv, prog) -> int`` (the exit code);
    ``extra``: the optional dependency group it needs (``pip install 'cdalign[extra]'``)."""

    name: str
    module: str
    summary: str
    extra: str | None = None

    def run(self, argv: list[str]) -> int:
        prog = f"{PROG} {self.name}"
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            if self.extra is None or (err.name or "").startswith("cdalign"):
                raise
            print(f"error: {prog} needs the {self.extra!r} extra ({err.name} is not installed): "
                  f"pip install 'cdalign[{self.extra}]'", file=sys.stderr)
            return 2
        return module.main(argv, prog=prog)


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("align", "cdalign.alignment.command",
            "constrained alignment of a diffusion model from a YAML recipe (default tiny/multi_reward)"),
    Command("compose", "cdalign.composition.command",
            "constrained composition of diffusion models (AND of adapters or concepts, OR of datasets)"),
    Command("evaluate", "cdalign.evaluation.command",
            "score checkpoints with the same prompts, seeds and rewards (default suite: tiny)"),
    Command("hub", "cdalign.publishing.hub", "push a run's LoRA to the Hugging Face Hub, pull one, publish the tiny models"),
    Command("demo", "cdalign.demo.command", "the browser demo on the embedded tiny model", extra="demo"),
)}


def usage() -> str:
    """``cdalign --help``: the subcommands and what each does."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    return (f"usage: {PROG} <command> [options]   ({PROG} <command> --help: that command's options)\n\n"
            f"Constrained alignment and composition of diffusion models (arXiv 2508.19104).\n\n"
            f"commands:\n{rows}\n\n"
            f"Recipes: a YAML file, or a recipe packaged with cdalign by name (tiny/multi_reward, compose/tiny_adapters, "
            f"...). Multi-process: accelerate launch [--config_file ...] -m {PROG} align ...\n")


def unknown_command(name: str) -> str:
    """The one error line for a subcommand that does not exist: its name, the close ones and all."""
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"error: {PROG}: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)}; see {PROG} --help)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to its subcommand. Returns the exit code:
    the subcommand's, 0 for ``--help``, 2 for a missing or unknown subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"{PROG} {version('cdalign')}")
        except PackageNotFoundError:  # run from a checkout that is not installed
            print(f"{PROG} (not installed; run from a checkout)")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(unknown_command(argv[0]), file=sys.stderr)
        return 2
    return command.run(argv[1:])
