"""cdalign demo: constrained alignment and composition of diffusion models, in a browser, on
the embedded tiny model (offline, on a CPU).

    python demo/app.py                       # http://127.0.0.1:7860, runs listed from ./outputs
    python demo/app.py --runs_dir outputs --port 7861 --resolution 64

The same folder is a Hugging Face Space (README.md front matter: sdk gradio, app_file
app.py). The page is :func:`cdalign.demo.page.build_demo`; everything it computes is
:mod:`cdalign.demo.engine` (cdalign's own sampling, scoring, verdicts and composition); the
LoRAs shipped with the demo are in ``loras/`` beside this file."""

import argparse
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning (recipes/align.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cdalign.demo.engine import GUIDANCE_SCALE, MODEL, DemoEngine  # noqa: E402
from cdalign.demo.page import build_demo  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = DEMO_DIR / "loras"  # the LoRAs shipped with the demo (the Space's loras/ too)


def make_engine(resolution: int | None = None, runs_dir: Path | None = None) -> DemoEngine:
    """The engine on this folder's shipped LoRAs; snippets show local folders relative to the
    folder above this one (the repository root)."""
    return DemoEngine(resolution=resolution, runs_dir=runs_dir, shipped_dir=SHIPPED_DIR, display_root=DEMO_DIR.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", default=os.environ.get("CDALIGN_DEMO_RUNS", "outputs"),
                        help="folder whose runs (folders holding pytorch_lora_weights.safetensors) the page lists; "
                             "only LoRAs inside it (or shipped with the demo) can be picked [default: outputs]")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels [default: the model's 64]")
    parser.add_argument("--host", default=None, help="address to serve on [default: 127.0.0.1, or GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=None, help="port [default: 7860, or GRADIO_SERVER_PORT]")
    args = parser.parse_args(argv)
    runs = Path(args.runs_dir)
    try:
        engine = make_engine(args.resolution, runs if runs.is_dir() else None)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"cdalign demo: {MODEL}, guidance {GUIDANCE_SCALE}; LoRAs: {', '.join(engine.catalog.choices()) or 'none'}")
    build_demo(engine).launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
