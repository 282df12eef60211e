"""Quality gates of the embedded tiny models ``cdalign/tiny-shapes-sd`` (Stable Diffusion
architecture) and ``cdalign/tiny-shapes-sd3`` (SD3 architecture, flow matching), measured
with the plain numpy classifier of ``cdalign.data.shapes`` (never with a learned reward).

    python evaluation/tiny_quality.py [--model cdalign/tiny-shapes-sd] [--write_card]
    python evaluation/tiny_quality.py --model cdalign/tiny-shapes-sd3 [--scheduler_shift 3.0] [--write_card]

Prints, for each guidance scale:

- colour fidelity: per colour word, the fraction of samples whose dominant foreground
  colour is the one the prompt names (gate: >= 80% for every colour);
- shape fidelity: per shape, the fraction whose bounding-box fill ratio reads as the
  named shape (gate: >= 60% overall);
- background and size accuracy (reported, not gated);
and once: diversity of one prompt over seeds (shape-centre spread, px; distinct
images), and the wall time of a 4-image batch at 20 sampler steps (the model's own
scheduler: DDIM for sd, flow-matching Euler for sd3).

The prompts are full shapes-world captions drawn with a fixed seed, ``samples_per_color``
per colour word, each with its own generator seed. ``--write_card`` writes the model
card (README.md) and a sample grid PNG into the model's folder from these numbers; the
card's architecture table and training text come from the folder's component configs and
``training_log.json`` (its ``architecture``: sd or sd3). The measurements are
:mod:`cdalign.evaluation.tiny_quality`; the table and the card :mod:`cdalign.publishing.tiny_card`
(through :func:`cdalign.publishing.cards.write_model_card`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cdalign/tiny-shapes-sd", help="Embedded name or diffusers folder.")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    parser.add_argument("--samples_per_color", type=int, default=32, help="Evaluation prompts per colour word.")
    parser.add_argument("--diversity_seeds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the evaluation prompts.")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads; 0 keeps the default.")
    parser.add_argument(
        "--scheduler_shift", type=float, default=None, help="Flow-matching models: sample with this scheduler shift instead of the saved one."
    )
    parser.add_argument("--write_card", action="store_true", help="Write README.md and samples.png into the model folder.")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from cdalign.evaluation.tiny_quality import evaluate, model_folder, sample_grid
    from cdalign.publishing.cards import write_model_card
    from cdalign.publishing.tiny_card import quality_table

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    results = evaluate(args.model, args.guidance_scales, args.samples_per_color, args.diversity_seeds, args.seed, args.scheduler_shift)
    pipe = results.pop("_pipe")
    results["torch_threads"] = torch.get_num_threads()
    results["evaluation_seconds"] = round(time.perf_counter() - start, 1)
    print(quality_table(results))
    print(json.dumps(results, indent=2))
    if args.write_card:
        folder = model_folder(args.model)
        grid = sample_grid(pipe, results["best_guidance_scale"])
        Image.fromarray(grid).save(folder / "samples.png", optimize=True)
        command = " ".join(["python evaluation/tiny_quality.py", *(argv if argv is not None else sys.argv[1:])])
        write_model_card(folder, kind="tiny_model", results=results, command=command)
        print(f"wrote {folder / 'README.md'} and {folder / 'samples.png'}")


if __name__ == "__main__":
    main()
