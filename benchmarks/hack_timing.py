"""At which sampling steps does a LoRA do its damage? Sample a finished run's held-out prompts
with its LoRA switched on only at some steps of the chain (the base model at the others),
on the same seeds, and read the images back with the shapes classifier.

    python benchmarks/hack_timing.py outputs/fidelity_floor/flow/no_floor
    python benchmarks/hack_timing.py RUN --early 6 --images 64

Rows: the base model; the LoRA at every step; the LoRA at the first ``--early`` steps only
(high noise: layout and background colour); the LoRA at the last ``T − early`` steps only
(the steps a ``backprop_steps`` gradient flows through when ``T − early`` equals it). A hack
that the first rows show and the last row does not is made at steps the truncated reward
gradient never sees, so a constraint whose gradient flows through the last steps only
(a fidelity floor among them) cannot pull it back there. Uses the run's own sampler (the
one sampler of cdalign, the run's eta: DDIM or the flow SDE) and brightness in the run's
σ units (``report.json``'s normalisation)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cdalign.alignment.config import load_config_file
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import evaluation_items
from cdalign.data.prompt_sets import load_prompts
from cdalign.data.shapes import classify_image, parse_prompt
from cdalign.models.adapters import adapters_disabled
from cdalign.models.lora import load_lora
from cdalign.models.pipeline import load_pipeline
from cdalign.publishing.tables import format_ci


class StepSwitch:
    """A predictor that runs the adapter at the chain steps in ``on`` and the base model at
    the others; counts its calls (one per step) from 0 for each new chain."""

    def __init__(self, guided, on: set[int], num_steps: int):
        self.guided, self.on, self.num_steps, self.calls = guided, on, num_steps, 0

    def __call__(self, x_t, t):
        step, self.calls = self.calls % self.num_steps, self.calls + 1
        if step in self.on:
            return self.guided(x_t, t)
        with adapters_disabled(self.guided.model):
            return self.guided(x_t, t)


def _mean_ci(values: np.ndarray) -> str:
    v = values[~np.isnan(values)]
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return format_ci(float(v.mean()), [float(v.mean() - half), float(v.mean() + half)], "+.3f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run folder (config.yaml, report.json, the LoRA)")
    parser.add_argument("--early", type=int, default=None, help="steps counted as early (default: T − backprop_steps)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=4242, help="image seeds (not the run's own evaluation seeds)")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    run = Path(args.run)
    try:
        cfg = load_config_file(run / "config.yaml")
        stats = json.loads((run / "report.json").read_text())["normalization"]["brightness"]
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {run}: not a finished run with brightness statistics ({err})", file=sys.stderr)
        return 2
    T = cfg.num_inference_steps
    early = args.early if args.early is not None else T - cfg.backprop_steps
    torch.manual_seed(0)
    pipe = load_pipeline(cfg.pretrained_model_name_or_path)
    load_lora(pipe, str(run), "run")
    sampler = DiffusionSampler(pipe, T, cfg.eta, cfg.guidance_scale, cfg.resolution, "cpu")
    prompts = load_prompts(cfg.eval_prompts or cfg.prompts)
    items = evaluation_items(prompts, args.images, args.seed)
    rows = {"base model": set(), "LoRA at every step": set(range(T)),
            f"LoRA at the first {early} steps only": set(range(early)),
            f"LoRA at the last {T - early} steps only": set(range(early, T))}
    lines = [f"{run}: {args.images} images of {len(prompts)} held-out prompts, {T} steps, eta {cfg.eta}",
             f"{'':<36} {'background acc.':>24} {'colour acc.':>24} {'shape acc.':>24} {'brightness (σ)':>24}"]
    for label, on in rows.items():
        values = {k: [] for k in ("background", "color", "shape")}
        bright = []
        for lo in range(0, len(items), args.batch_size):
            batch = items[lo:lo + args.batch_size]
            ps, seeds = [p for p, _ in batch], [s for _, s in batch]
            with torch.no_grad():
                images = sampler.sample(StepSwitch(sampler.guided(ps), on, T), seeds)
            u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for im, p in zip(u8, ps):
                seen, asked = classify_image(im), parse_prompt(p)
                for k in values:
                    values[k].append(np.nan if asked[k] is None else float(seen[k] == asked[k]))
            luma = (images.clamp(0, 1) * torch.tensor([0.2126, 0.7152, 0.0722]).view(1, 3, 1, 1)).sum(1).mean((1, 2))
            bright += ((luma.numpy() - stats["mean"]) / stats["std"]).tolist()
        cells = [_mean_ci(np.array(values[k])) for k in ("background", "color", "shape")] + [_mean_ci(np.array(bright))]
        lines.append(f"{label:<36} " + " ".join(f"{c:>24}" for c in cells))
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
