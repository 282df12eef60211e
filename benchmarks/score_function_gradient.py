"""How good is a constraint's score-function gradient at a recipe's batch size? Measure it
against the pathwise (backpropagated) gradient of the same term on the same images.

    python benchmarks/score_function_gradient.py --config tiny/flow_multi_reward_floor --constraint 2
    python benchmarks/score_function_gradient.py --config tiny/flow_multi_reward_floor --constraint 2 \\
        --lora outputs/fidelity_floor/flow/no_floor --micro_batches 16

For constraint ``--constraint`` of the recipe (a differentiable reward), with λ = 1 and every
other constraint dropped, each of ``--micro_batches`` micro-batches of the recipe's training
stream (the same seeds for every row) gives the gradient of that constraint's term ``λ·g`` in
the LoRA weights (initialised as the run does, or ``--lora``: a finished run's weights, where a
hack has already happened), by:

- pathwise through every step (``backprop_steps`` = T): the reference, the full chain's gradient;
- pathwise through the last K steps (the recipe's ``backprop_steps``): what ``gradient: backprop`` gets;
- ``gradient: hybrid``: the last K pathwise plus the score function of the steps before;
- ``gradient: score_function``: the score function of every step;

the last two with each ``--advantages`` kind. Printed per row: the cosine and projection ratio
``⟨ĝ, g⟩/‖g‖²`` of the row's mean over the micro-batches against the reference's mean (1: right
direction and scale; the truncated row shows what the steps it misses carry), and the mean
cosine of a single micro-batch's estimate with the reference (its signal at the recipe's batch
size). The chain KL's gradient (the objective) is taken out: each row subtracts the same
micro-batch's gradient with λ = 0."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from cdalign import ConstrainedDDPOTrainer
from cdalign.alignment.config import config_from_dict, config_to_dict, load_config_file
from cdalign.core.seeding import TRAIN_BATCH


def _trainer(base: dict, constraint: dict, out: Path, **changes) -> ConstrainedDDPOTrainer:
    recipe = {**base, "constraints": [constraint], "dual": {"optimizer": "ascent", "init": 1.0, "freeze": True},
              "output_dir": str(out), "overwrite_output_dir": True, "eval_batches": 0, "num_grid_images": 0, **changes}
    return ConstrainedDDPOTrainer(config_from_dict(recipe))


def _load_lora(trainer: ConstrainedDDPOTrainer, run: Path) -> None:
    """A finished run's LoRA (diffusers layout) into the trainer's trainable adapter."""
    from safetensors.torch import load_file

    saved = load_file(str(run / "pytorch_lora_weights.safetensors"))
    params = trainer._lora_params()
    with torch.no_grad():
        for key, value in saved.items():
            name = key.split(".", 1)[1].replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight")
            params[name].copy_(value)


def _gradient(trainer: ConstrainedDDPOTrainer, index: int, lam: float) -> torch.Tensor:
    """The LoRA gradient of one micro-batch's Lagrangian (λ = ``lam``), its score-function terms included."""
    params = list(trainer._lora_params().values())
    for p in params:
        p.grad = None
    prompts, seeds, g = trainer._global_batch(TRAIN_BATCH, index, trainer.prompts, trainer.config.train_batch_size)
    estimate = trainer.estimator(prompts, seeds, torch.tensor([lam]), g)
    estimate.loss.backward()
    trainer._backward_score_function(estimate)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a recipe (file or packaged name)")
    parser.add_argument("--constraint", type=int, required=True, help="index of the constraint to measure")
    parser.add_argument("--lora", default=None, help="a finished run folder whose LoRA to start from")
    parser.add_argument("--micro_batches", type=int, default=8)
    parser.add_argument("--advantages", nargs="+", default=["leave_one_out", "batch_std"])
    args = parser.parse_args(argv)
    cfg = load_config_file(args.config)
    base = config_to_dict(cfg)
    constraint = {k: v for k, v in dataclasses.asdict(cfg.constraints[args.constraint]).items()
                  if k not in ("confidence", "margin", "gradient")}
    T, K = cfg.num_inference_steps, cfg.backprop_steps
    rows = [("pathwise, every step", dict(backprop_steps=T), "backprop"),
            (f"pathwise, last {K} steps", {}, "backprop")]
    rows += [(f"{gradient} ({kind})", dict(score_function_advantage=kind), gradient)
             for gradient in ("hybrid", "score_function") for kind in args.advantages]
    grads: dict[str, list[torch.Tensor]] = {}
    with TemporaryDirectory() as tmp:
        kl = {}  # backprop_steps -> the KL objective's gradient per micro-batch (λ = 0)
        for label, changes, gradient in rows:
            trainer = _trainer(base, {**constraint, "gradient": gradient}, Path(tmp) / "run", **changes)
            if args.lora:
                _load_lora(trainer, Path(args.lora))
            trainer.ensure_normalization()
            k = trainer.config.backprop_steps
            if k not in kl:
                kl[k] = [_gradient(trainer, i, 0.0) for i in range(args.micro_batches)]
            grads[label] = [_gradient(trainer, i, 1.0) - kl[k][i] for i in range(args.micro_batches)]
            print(f"{label}: done", file=sys.stderr, flush=True)
    reference = torch.stack(grads[rows[0][0]]).mean(0)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))  # noqa: E731
    lines = [f"{args.config}, constraint {args.constraint} ({constraint['reward']}), λ = 1, "
             f"{args.micro_batches} micro-batches of {cfg.train_batch_size}, T = {T}, K = {K}"
             + (f", LoRA of {args.lora}" if args.lora else ", LoRA at initialisation"),
             f"{'row':<34} {'cos(mean, ref)':>15} {'⟨mean,ref⟩/‖ref‖²':>18} {'‖mean‖/‖ref‖':>13} {'mean cos(one, ref)':>19}"]
    for label, _, _ in rows:
        g = torch.stack(grads[label])
        mean = g.mean(0)
        one = sum(cos(x, reference) for x in g) / len(g)
        lines.append(f"{label:<34} {cos(mean, reference):>15.3f} {float(mean @ reference / (reference @ reference)):>18.3f} "
                     f"{float(mean.norm() / reference.norm()):>13.2f} {one:>19.3f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
