"""Open the demo in headless Chromium, let it run one generation, save a screenshot.

    python demo/screenshot.py --out demo/screenshot.png          # starts the demo itself (64 px)
    python demo/screenshot.py --url http://127.0.0.1:7860 --out shot.png   # a demo already running

The page is opened as ``?example=K``, which runs held-out prompt K with the first shipped LoRA
(base vs aligned); the screenshot is taken once both galleries show their images. Chromium
is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``,
:mod:`cdalign.demo.browser`), so nothing but the Debian ``chromium`` package is needed (no
browser-automation library, no download)."""

import argparse
import sys
from pathlib import Path

from cdalign.demo.browser import VIEWS, capture, free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo/screenshot.png", help="where the PNG goes")
    parser.add_argument("--url", default=None, help="a running demo; unset: start one here on a free port")
    parser.add_argument("--example", type=int, default=3,
                        help="held-out prompt to run (index into shapes_eval; 3: a purple circle on a black background)")
    parser.add_argument("--resolution", type=int, default=None, help="image side when starting the demo here")
    parser.add_argument("--view", choices=sorted(VIEWS), default="aligned",
                        help="aligned: base vs aligned (?example=K); composition: the Composition tab after Compose")
    parser.add_argument("--small", action="store_true", help="save a 256-colour palette PNG (a fraction of the size)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    demo = None
    url = args.url
    if url is None:
        from cdalign.demo.page import build_demo

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from app import make_engine  # the demo beside this file, with its shipped LoRAs

        port = free_port()
        demo = build_demo(make_engine(resolution=args.resolution))
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
        url = f"http://127.0.0.1:{port}/"
    try:
        query, click, galleries = VIEWS[args.view]
        shot = capture(f"{url.rstrip('/')}/" + query.format(example=args.example), width=args.width, height=args.height,
                       click=click, galleries=galleries)
    except (FileNotFoundError, TimeoutError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if demo is not None:
            demo.close()
    Path(args.out).write_bytes(shot.png)
    if args.small:
        import io

        from PIL import Image

        Image.open(io.BytesIO(shot.png)).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size} bytes; images loaded {shot.rendered}; {shot.seconds:.1f} s to render")
    return 0 if not shot.rendered.get("errors") and all(shot.rendered.get(g) for g in galleries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
