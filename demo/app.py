"""cdalign demo: constrained alignment and composition of diffusion models, in a browser, on
the embedded tiny model (offline, on a CPU).

    cdalign demo                             # the same page, from anywhere (the demo extra)
    python demo/app.py                       # http://127.0.0.1:7860, runs listed from ./outputs
    python demo/app.py --runs_dir outputs --port 7861 --resolution 64

The same folder is a Hugging Face Space (README.md front matter: sdk gradio, app_file
app.py). The command is :mod:`cdalign.demo.command`, the page
:func:`cdalign.demo.page.build_demo`; everything it computes is :mod:`cdalign.demo.engine`
(cdalign's own sampling, scoring, verdicts and composition); the LoRAs shipped with the demo
are in ``loras/`` beside this file."""

import sys
from pathlib import Path

from cdalign.demo import command
from cdalign.demo.engine import DemoEngine

DEMO_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = DEMO_DIR / "loras"  # the LoRAs shipped with the demo (the Space's loras/ too)


def make_engine(resolution: int | None = None, runs_dir: Path | None = None) -> DemoEngine:
    """The engine on this folder's shipped LoRAs; snippets show local folders relative to the
    folder above this one (the repository root)."""
    return command.make_engine(resolution, runs_dir, SHIPPED_DIR, DEMO_DIR.parent)


def main(argv: list[str] | None = None) -> int:
    return command.main(argv, shipped_dir=SHIPPED_DIR, display_root=DEMO_DIR.parent)


if __name__ == "__main__":
    sys.exit(main())
