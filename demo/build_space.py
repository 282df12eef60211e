"""Build the folder that deploys as a Hugging Face Space: this demo's files plus a wheel of the
cdalign checkout it sits in (cdalign is installed from that wheel; requirements.txt names it).

    python demo/build_space.py --out outputs/space
    hf upload you/cdalign-demo outputs/space --repo-type space     # then the Space builds and runs app.py

Nothing is downloaded: the wheel is built from the local source with ``pip wheel --no-deps``."""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent
ROOT = DEMO.parent
FILES = ("app.py", "README.md", "requirements.txt", "screenshot.png")  # the rest is cdalign.demo, in the wheel
WHEEL_LINE = re.compile(r"^\./wheels/(?P<file>[^\s\[]+\.whl)(?P<extras>\[[^\]]*\])?\s*$", re.M)


def wheel_named_in_requirements(text: str) -> str:
    match = WHEEL_LINE.search(text)
    if match is None:
        raise ValueError("demo/requirements.txt names no ./wheels/<cdalign wheel>[demo] line; add it back")
    return match.group("file")


def build(out: Path) -> Path:
    """Write the Space folder ``out`` (replacing it); returns the wheel's path."""
    if out.resolve() in (ROOT, DEMO) or ROOT.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--out {str(out)!r} would replace the checkout; choose a new folder, e.g. outputs/space")
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    for name in FILES:
        if (DEMO / name).is_file():
            shutil.copy2(DEMO / name, out / name)
    shutil.copytree(DEMO / "loras", out / "loras")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out / "wheels"), str(ROOT)], check=True)
    built = sorted((out / "wheels").glob("cdalign-*.whl"))
    wanted = wheel_named_in_requirements((DEMO / "requirements.txt").read_text())
    if [w.name for w in built] != [wanted]:
        raise RuntimeError(f"built {[w.name for w in built]} but requirements.txt installs {wanted!r}: update the "
                           "wheel line of demo/requirements.txt to the built name (the cdalign version changed)")
    return built[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/space", help="the Space folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        wheel = build(Path(args.out))
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"{args.out}: Space folder, {size / 1e6:.1f} MB ({wheel.name}); upload it with "
          f"`hf upload <you>/<space> {args.out} --repo-type space`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
