"""Score a run with code that did not produce it: plain diffusers, fresh seeds, numpy.

    python evaluation/independent_check.py outputs/tiny-multi-reward [outputs/tiny-multi-reward/equal_weights/init ...]

For the base model and each run's LoRA (the pipeline class its ``model_index.json`` names,
``from_pretrained`` on the model folder, ``pipe.load_lora_weights(run)``, diffusers' own sampler
and classifier-free guidance: DDIM with the run's eta for Stable Diffusion; for a flow model
(SD3) the pipeline's own Euler ODE, so the images are what ``pipe()`` gives a user, not the
run's SDE samples; ``pipe(...)`` with per-image ``torch.Generator`` seeds that cdalign's
evaluation never uses), draws ``--num_images`` images of the held-out prompts and computes
with numpy only, from the 8-bit images a user would save:

- colorfulness (Hasler & Süsstrunk 2003), brightness (mean Rec. 709 luminance) and JPEG
  compressibility (minus PIL's JPEG size in kB at quality 95), those of them the run normalised,
  in σ units of the run's own base-model statistics (``report.json`` → ``normalization``),
- the shapes classifier's colour, shape and background accuracy (``cdalign.data.shapes.classify_image``,
  numpy, no reward uses it).

Prints a table (mean and 95% CI per model, and each LoRA's paired difference to the base on
the same seeds) and writes ``independent_check.json`` into the first run's folder. It reads
the run's ``config.yaml`` for the sampler settings and the evaluation prompts. The formulas are
:mod:`cdalign.evaluation.independent` (numpy only, nothing from ``cdalign.rewards``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from cdalign.evaluation.independent import FORMULAS, summary  # noqa: E402  (numpy only, apart from cdalign.rewards)

def main(argv=None) -> int:
    import inspect

    import diffusers
    import torch
    from diffusers import DDIMScheduler

    from cdalign.data.prompt_sets import load_prompts
    from cdalign.data.shapes import classify_image, parse_prompt

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (config.yaml, report.json, pytorch_lora_weights.safetensors)")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=777, help="first image seed (cdalign's evaluation uses other seeds)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--names", nargs="+", default=None, help="a label per run (default: the run folders)")
    parser.add_argument("--out", default=None, help="where to write the JSON (default: <first run>/independent_check.json)")
    parser.add_argument("--grid", default=None, help="also write a PNG grid: the base model and each run, one row each, "
                        "the first --grid_images images (same prompts and seeds down each column)")
    parser.add_argument("--grid_images", type=int, default=8)
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        print(f"error: --names: {len(args.names)} labels for {len(args.runs)} runs; give one per run", file=sys.stderr)
        return 2

    runs = [Path(r) for r in args.runs]
    for run in runs:
        missing = [f for f in ("config.yaml", "report.json", "pytorch_lora_weights.safetensors") if not (run / f).is_file()]
        if missing:
            print(f"error: {str(run)!r} is not a finished run (no {', '.join(missing)})", file=sys.stderr)
            return 2
    from cdalign.fields import read_yaml_mapping
    from cdalign.runs.report import AlignmentReport

    try:  # errors name the file and what in it is wrong
        config = read_yaml_mapping(runs[0] / "config.yaml")
        stats = AlignmentReport.read(runs[0] / "report.json").to_json().get("normalization") or {}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = config["pretrained_model_name_or_path"]
    if model.startswith("cdalign/"):  # an embedded model: its diffusers folder inside the package
        from importlib import resources

        model = str(resources.files("cdalign").joinpath("data", model.split("/", 1)[1]))
    prompts_all = load_prompts(config.get("eval_prompts") or config["prompts"])
    prompts = [prompts_all[i % len(prompts_all)] for i in range(args.num_images)]
    seeds = [args.seed + i for i in range(args.num_images)]

    index = json.loads((Path(model) / "model_index.json").read_text()) if Path(model).is_dir() else {}
    pipeline_class = getattr(diffusers, index.get("_class_name", "StableDiffusionPipeline"))
    absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry == [None, None]}
    pipe = pipeline_class.from_pretrained(model, **absent)  # e.g. SD3 without T5: text_encoder_3=None
    if pipeline_class is diffusers.StableDiffusionPipeline:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    takes_eta = "eta" in inspect.signature(pipe.__call__).parameters
    pipe.set_progress_bar_config(disable=True)

    def draw() -> np.ndarray:
        out = []
        for lo in range(0, len(prompts), args.batch_size):
            gens = [torch.Generator().manual_seed(s) for s in seeds[lo : lo + args.batch_size]]
            images = pipe(
                prompts[lo : lo + args.batch_size], num_inference_steps=int(config["num_inference_steps"]),
                guidance_scale=float(config["guidance_scale"]), generator=gens, output_type="np",
                **({"eta": float(config["eta"])} if takes_eta else {}),
            ).images
            out.append(np.round(images * 255).astype(np.uint8))  # what a saved PNG holds
        return np.concatenate(out)

    def score(images_u8: np.ndarray) -> dict:
        x = images_u8.astype(np.float64) / 255
        values = {name: (f(x, images_u8) - stats[name]["mean"]) / stats[name]["std"]
                  for name, f in FORMULAS.items() if name in stats}  # the run's rewards it can recompute
        seen = [classify_image(im) for im in images_u8]
        asked = [parse_prompt(p) for p in prompts]
        for key in ("color", "shape", "background"):
            values[f"{key}_accuracy"] = np.array(
                [np.nan if a[key] is None else float(s[key] == a[key]) for s, a in zip(seen, asked)]
            )
        return values

    labels = args.names or [str(r) for r in runs]
    drawn = {"base": draw()}
    results = {"base": score(drawn["base"])}
    for i, run in enumerate(runs):
        name = f"run{i}"
        pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors", adapter_name=name)
        pipe.set_adapters([name])
        drawn[labels[i]] = draw()
        results[labels[i]] = score(drawn[labels[i]])
        pipe.delete_adapters([name])
    if args.grid:
        from cdalign.publishing.plotting import save_grid

        k = min(args.grid_images, args.num_images)
        save_grid(args.grid, [torch.from_numpy(v[:k]).permute(0, 3, 1, 2).float() / 255 for v in drawn.values()], list(drawn))

    table = {}
    for key, values in results.items():
        table[key] = {}
        for metric, v in values.items():
            entry = summary(v)
            if key != "base":
                entry["difference"] = summary(v - results["base"][metric])
            table[key][metric] = entry
    lines = [f"independent check: diffusers {pipeline_class.__name__}(), {args.num_images} images of {len(prompts_all)} held-out prompts, "
             f"seeds {seeds[0]}..{seeds[-1]}, numpy metrics (σ units: the run's base statistics)"]
    metrics = list(results["base"])
    lines.append(f"{'model':<44}" + "".join(f"{m:>26}" for m in metrics))
    for key, row in table.items():
        cells = []
        for m in metrics:
            e = row[m]
            cell = f"{e['mean']:+.3f} [{e['ci95'][0]:+.2f},{e['ci95'][1]:+.2f}]"
            cells.append(f"{cell:>26}")
        lines.append(f"{key[-44:]:<44}" + "".join(cells))
        if key != "base":
            diffs = [f"{'Δ ' + format(row[m]['difference']['mean'], '+.3f'):>26}" for m in metrics]
            lines.append(f"{'  paired difference to base':<44}" + "".join(diffs))
    print("\n".join(lines))
    out = Path(args.out) if args.out else runs[0] / "independent_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"num_images": args.num_images, "seeds": [seeds[0], seeds[-1]], "prompts": prompts,
                               "runs": dict(zip(labels, map(str, runs))), "results": table}, indent=2))
    print(f"wrote {out}" + (f", {args.grid}" if args.grid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
