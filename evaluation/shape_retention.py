"""Does a flow model keep a shape it is handed? Noise true scenes, let the model finish them.

    python evaluation/shape_retention.py --model cdalign/tiny-shapes-sd3 [--sigmas 0 0.3 0.5 0.7 1]

Renders fresh shapes-world scenes (``cdalign.data.shapes``), encodes them with the model's VAE
(posterior mean), mixes in noise to flow time ``s`` (``x_s = (1 - s) x0 + s eps``, rectified
flow) and lets the pipeline's own sampler (``StableDiffusion3Pipeline.__call__`` with
``latents=x_s`` and ``sigmas`` from ``s`` down, its Euler ODE and classifier-free guidance)
finish the image from the scene's full caption. The numpy shapes classifier then reads the
shape of each result. ``s = 0`` is the VAE's own round trip (the ceiling); ``s = 1`` is plain
generation. Where a shape is lost between ``s = 0`` and small ``s``, the denoiser itself
reshapes a scene that is already drawn, not the prompt following at high noise.

Prints, per ``s``, the share of images read as their own shape (per shape and overall; the
same images and noise at every ``s``).

The scheduler applies its time ``shift`` to the ``sigmas`` it is given (``a u / (1 + (a - 1) u)``),
so the start is passed unshifted (``u0`` with shift(u0) = s) and spaced as the model's own
schedule, ``linspace(u0, u0 / n, n)``: the first step runs at exactly ``s``, the time the latents
were noised to, whatever the model's shift. Schedulers with resolution-dependent (dynamic)
shifting are refused. The measurement is :mod:`cdalign.evaluation.shape_retention`."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cdalign/tiny-shapes-sd3", help="Embedded name or diffusers folder of a flow (SD3) pipeline.")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.85, 1.0], help="Flow times s in [0, 1] to start from.")
    p.add_argument("--num_images", type=int, default=48)
    p.add_argument("--num_inference_steps", type=int, default=20, help="Euler steps over the whole [0, 1]; a start at s takes round(s x this).")
    p.add_argument("--guidance_scale", type=float, default=None, help="Default: the model's recommended guidance.")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--num_threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from cdalign.evaluation.shape_retention import retention
    from cdalign.models.pipeline import load_pipeline
    from cdalign.models.tiny_pretrained import RECOMMENDED_SD3_GUIDANCE_SCALE

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if any(not 0 <= s <= 1 for s in args.sigmas):
        print(f"--sigmas {args.sigmas}: every flow time must lie in [0, 1]", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model)
    if type(pipe).__name__ != "StableDiffusion3Pipeline":
        print(f"--model {args.model}: a {type(pipe).__name__}; this check needs a StableDiffusion3Pipeline (flow model)", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    guidance = RECOMMENDED_SD3_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
    table = retention(pipe, args.seed, args.num_images, args.sigmas, args.num_inference_steps, guidance)
    shapes_ = [k for k in next(iter(table.values())) if k != "all"]
    print(f"{args.model}: shape read back by the numpy classifier, {args.num_images} scenes (seed {args.seed}), guidance {guidance}")
    print("| s | " + " | ".join(shapes_) + " | all |")
    print("|---|" + "---|" * (len(shapes_) + 1))
    for s, row in table.items():
        print(f"| {s:g} | " + " | ".join(f"{row[k]:.0%}" for k in [*shapes_, "all"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
