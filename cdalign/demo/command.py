"""``cdalign demo`` (and ``demo/app.py``, the Space's app file): the demo page on the embedded
tiny model, served on this machine (offline, on a CPU). Needs the ``demo`` extra (gradio).

    cdalign demo                              # http://127.0.0.1:7860, runs listed from ./outputs
    cdalign demo --runs_dir outputs --port 7861 --resolution 64

From a checkout, the LoRAs shipped with the demo (``demo/loras``) are listed too; an
installed package lists the runs of ``--runs_dir`` only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cdalign.demo.engine import GUIDANCE_SCALE, MODEL, DemoEngine
from cdalign.demo.page import build_demo
from cdalign.fields import CommandLineParser

# The LoRAs shipped with the demo in a checkout, relative to the current folder (its root).
CHECKOUT_SHIPPED_DIR = Path("demo") / "loras"


def make_engine(resolution: int | None = None, runs_dir: Path | None = None, shipped_dir: Path | None = None,
                display_root: Path | None = None) -> DemoEngine:
    """The engine on ``shipped_dir``'s LoRAs (None: none) and ``runs_dir``'s runs; snippets
    show local folders relative to ``display_root``."""
    return DemoEngine(resolution=resolution, runs_dir=runs_dir, shipped_dir=shipped_dir, display_root=display_root)


def main(argv: list[str] | None = None, prog: str | None = None, shipped_dir: Path | None = None,
         display_root: Path | None = None) -> int:
    """Serve the page until interrupted. ``shipped_dir``: the demo's own LoRAs (default
    ``demo/loras`` when the current folder is a checkout); ``display_root``: where snippets
    show local folders from (default the current folder). Exit codes: 0 done, 2 bad input."""
    parser = CommandLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default=os.environ.get("CDALIGN_DEMO_RUNS", "outputs"),
                        help="folder whose runs (folders holding pytorch_lora_weights.safetensors) the page lists; "
                             "only LoRAs inside it (or shipped with the demo) can be picked [default: outputs]")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels [default: the model's 64]")
    parser.add_argument("--host", default=None, help="address to serve on [default: 127.0.0.1, or GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=None, help="port [default: 7860, or GRADIO_SERVER_PORT]")
    args = parser.parse_args(argv)
    if shipped_dir is None and CHECKOUT_SHIPPED_DIR.is_dir():
        shipped_dir = CHECKOUT_SHIPPED_DIR
    runs = Path(args.runs_dir)
    try:
        engine = make_engine(args.resolution, runs if runs.is_dir() else None, shipped_dir,
                             display_root if display_root is not None else Path.cwd())
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"cdalign demo: {MODEL}, guidance {GUIDANCE_SCALE}; LoRAs: {', '.join(engine.catalog.choices()) or 'none'}")
    build_demo(engine).launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0
