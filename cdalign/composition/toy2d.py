"""The paper's 2D composition experiments (``recipes/toy2d.py``), exactly checkable, on a
CPU in minutes.

AND (reverse KL, product): three component score models, two similar ones on the left and
one on the right. Composed ε_μ = Σ μ_i ε_i (:class:`~cdalign.composition.components.ComposedPredictor`)
sampled with cdalign's DDIM chain; μ learned by projected dual ascent on the chain KL to each
component (:class:`~cdalign.composition.components.ComponentKL`). Equal weights are pulled
toward the similar pair; the min-max weights sit between the groups.
OR (forward KL, mixture): dataset A = one Gaussian at (0.75, 0), dataset B = two at
(-0.75, ±0.75), variance 0.025; one model trained on Σ μ_i·DSM_i
(:func:`~cdalign.composition.mixture.dsm_loss`) with μ ascending on the raw losses or on the
excess losses (loss minus each dataset's irreducible loss).

Because everything is 2D, the exact answer is computed on a dense grid from the true data
densities: the product Π q_i^μ_i / Z (or the mixture Σ μ_i q_i), KL to each component, and
the min-max weights μ* by search over the simplex. The table
(:func:`cdalign.publishing.composition_tables.toy2d_table`) compares equal weights, learned
weights and μ*."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cdalign.composition.components import ComponentKL, ComposedPredictor, StackedPredictors
from cdalign.composition.mixture import dsm_loss, excess_loss
from cdalign.composition.plotting import plot_toy2d_and as plot_and
from cdalign.composition.plotting import plot_toy2d_or as plot_or
from cdalign.composition.simplex import SimplexDual
from cdalign.core.chains import DDIMChain
from cdalign.core.sampling import sample_latents


@dataclass
class Toy2DSettings:
    """The knobs of the 2D experiments (``recipes/toy2d.py``'s flags)."""

    out: Path = Path("outputs/toy2d")  # where the plots go
    train_steps: int = 1500  # optimiser steps per score model
    samples: int = 2000  # samples per chain-KL estimate / scatter
    num_inference_steps: int = 50  # DDIM steps (η = 1)
    and_dual_steps: int = 20
    and_lr: float = 0.3  # dual step per unit of the largest KL (normalised ascent)
    or_lr: float = 2.0  # dual step per unit of loss
    seed: int = 0
    plots: bool = True

    def quick(self) -> "Toy2DSettings":
        """Fewer steps and samples (a smoke test)."""
        self.train_steps, self.samples, self.num_inference_steps, self.and_dual_steps = 300, 400, 20, 5
        return self


# A Gaussian mixture is a list of (weight, mean (2,), variance); isotropic components.
BLOB = [(-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25)]


def blob(cx, cy, var=0.04):
    """Four equal Gaussians around (cx, cy): a broad, bumpy component."""
    return [(0.25, (cx + dx, cy + dy), var) for dx, dy in BLOB]


AND_SETUP = {  # two similar components on the left, one on the right
    "left_up": blob(-0.55, 0.1),
    "left_down": blob(-0.55, -0.1),
    "right": blob(0.55, 0.0),
}
OR_SETUP = {
    "A": [(1.0, (0.75, 0.0), 0.025)],
    "B": [(0.5, (-0.75, 0.75), 0.025), (0.5, (-0.75, -0.75), 0.025)],
}
OR_MODES = np.array([(0.75, 0.0), (-0.75, 0.75), (-0.75, -0.75)])


def sample_mixture(mix, n, g: torch.Generator) -> torch.Tensor:
    w = torch.tensor([m[0] for m in mix])
    k = torch.multinomial(w, n, replacement=True, generator=g)
    means = torch.tensor([m[1] for m in mix], dtype=torch.float32)[k]
    std = torch.tensor([m[2] for m in mix]).sqrt()[k, None]
    return means + std * torch.randn(n, 2, generator=g)


def log_density(mix, xy: np.ndarray) -> np.ndarray:
    """log q(x) of a mixture at points xy (G, 2)."""
    terms = [math.log(w) - ((xy - np.array(m)) ** 2).sum(1) / (2 * v) - math.log(2 * math.pi * v) for w, m, v in mix]
    return np.logaddexp.reduce(np.stack(terms), axis=0)


# ----------------------------------------------------------------------------- exact answers on a grid
def make_grid(lim=2.5, n=240):
    xs = np.linspace(-lim, lim, n)
    X, Y = np.meshgrid(xs, xs)
    return np.stack([X.ravel(), Y.ravel()], 1), (xs[1] - xs[0]) ** 2, X.shape


def product_kl(log_q: np.ndarray, weights: np.ndarray, dA: float) -> np.ndarray:
    """KL(p_μ‖q_i) for p_μ = Π q_i^{μ_i}/Z. log_q (n, G); weights (P, n) -> (P, n) nats."""
    log_p = weights @ log_q
    log_p -= np.logaddexp.reduce(log_p, axis=1, keepdims=True) + math.log(dA)
    p = np.exp(log_p) * dA
    return np.stack([(p * (log_p - lq)).sum(1) for lq in log_q], 1)


def mixture_kl(log_q: np.ndarray, weights: np.ndarray, dA: float) -> np.ndarray:
    """KL(q_i‖Σ_j μ_j q_j) (forward KL). log_q (n, G); weights (P, n) -> (P, n) nats."""
    out = []
    for w in weights:
        log_mix = np.logaddexp.reduce(np.log(np.maximum(w, 1e-300))[:, None] + log_q, axis=0)
        out.append([(np.exp(lq) * dA * (lq - log_mix)).sum() for lq in log_q])
    return np.array(out)


def simplex_points(n: int, step: float) -> np.ndarray:
    k = round(1 / step)
    pts = [c for c in itertools.product(range(k + 1), repeat=n - 1) if sum(c) <= k]
    return np.array([[*c, k - sum(c)] for c in pts], dtype=float) / k


def exact_minmax(kl_fn, log_q: np.ndarray, dA: float, step: float = 0.01, refine: int = 1):
    """μ* = argmin_μ max_i KL_i(μ) by search over the simplex: a grid of ``step``, then
    ``refine`` searches on a 5x finer grid within one coarse step of the best point.
    Returns (μ* (n,), KL(μ*) (n,))."""
    n = log_q.shape[0]
    cand = simplex_points(n, step)
    for r in range(refine + 1):
        kls = np.concatenate([kl_fn(log_q, cand[i : i + 256], dA) for i in range(0, len(cand), 256)])
        j = int(kls.max(1).argmin())
        best = (cand[j], kls[j])
        fine = simplex_points(n, step / 5 ** (r + 1))
        cand = fine[np.abs(fine - best[0]).max(1) <= step / 5**r + 1e-12]
    return best


# ----------------------------------------------------------------------------- score models
class ScoreNet(nn.Module):
    """ε_θ(x_t, t): an MLP on (x, sinusoidal embedding of t)."""

    def __init__(self, hidden=128, freqs=16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), freqs)))
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1) / 1000
        emb = torch.cat([torch.sin(t * self.freqs), torch.cos(t * self.freqs)], 1)
        return self.net(torch.cat([x, emb], 1))


def make_schedule():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def point_dsm(model, x0, t, noise, alphas_cumprod) -> torch.Tensor:
    """Per-sample DSM loss ‖ε − ε_θ(√ᾱ x0 + √(1−ᾱ) ε, t)‖² (B,), summed over the two
    coordinates: cdalign's :func:`~cdalign.composition.mixture.dsm_loss` on points."""
    return dsm_loss(model, x0, t, noise, alphas_cumprod, reduce="sum")


def train_score(mixes, weights_fn, steps, g, ac, batch=512, lr=2e-3, on_dual=None, dual_every=50):
    """Train one ScoreNet on Σ_i μ_i·DSM_i over the datasets ``mixes`` (weights_fn() -> μ)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    model = ScoreNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        mu = weights_fn()
        loss = 0.0
        for i, mix in enumerate(mixes):
            x0 = sample_mixture(mix, batch, g)
            t = torch.randint(0, 1000, (batch,), generator=g)
            loss = loss + float(mu[i]) * point_dsm(model, x0, t, torch.randn(batch, 2, generator=g), ac).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_dual is not None and (step + 1) % dual_every == 0:
            on_dual(model)
    return model.eval()


@torch.no_grad()
def fixed_losses(model, eval_sets, ac) -> np.ndarray:
    """DSM loss of ``model`` on each dataset's fixed (x0, t, ε) triples (n,)."""
    return np.array([float(point_dsm(model, x0, t, e, ac).mean()) for x0, t, e in eval_sets])


# ----------------------------------------------------------------------------- composed sampling and chain KL
@torch.no_grad()
def sample_and_kl(models, weights, chain, n, seed, estimator="path"):
    """Samples of p_μ (n, 2) and the chain KL(p_μ‖q_i) per component (n_comp,) along its path:
    the library's composed model ε_μ = Σ μ_i ε_i and its KL hook, which reuses the component
    predictions of each composed step."""
    g = torch.Generator().manual_seed(seed)
    x_T, noise = torch.randn(n, 2, generator=g), torch.randn(len(chain), n, 2, generator=g)
    composed = ComposedPredictor(StackedPredictors(models), weights)
    hook = ComponentKL(composed.cached, chain, estimator, len(models))
    x0 = sample_latents(composed, chain, x_T, noise, on_step=hook)
    return x0, hook.per_sample.mean(1).double()


# ----------------------------------------------------------------------------- the experiments
def run_and(args: Toy2DSettings, chain, ac, grid, dA, shape, g) -> dict:
    """AND: train one score model per component, learn μ by dual ascent on the chain KL (and on the exact
    KL, as a check), score equal, learned, averaged and exact μ* weights; ``and.png`` with ``args.plots``."""
    names = list(AND_SETUP)
    t0 = time.time()
    models = [train_score([AND_SETUP[n]], lambda: [1.0], args.train_steps, g, ac) for n in names]
    train_s = time.time() - t0
    log_q = np.stack([log_density(AND_SETUP[n], grid) for n in names])
    mu_star, kl_star = exact_minmax(product_kl, log_q, dA)

    # Dual ascent on the chain KL of the learned models (the method), and on the exact KL (a check of the algorithm).
    dual = SimplexDual(len(names), lr=args.and_lr, schedule="inverse_sqrt", normalize=True)
    trajectory = [dual.weights.tolist()]
    for k in range(args.and_dual_steps):
        _, kl = sample_and_kl(models, dual.weights, chain, args.samples, seed=100 + k)
        dual.step(kl)
        trajectory.append(dual.weights.tolist())
    exact_dual = SimplexDual(len(names), lr=args.and_lr, schedule="inverse_sqrt", normalize=True)
    for _ in range(args.and_dual_steps):
        exact_dual.step(torch.tensor(product_kl(log_q, exact_dual.weights.numpy()[None], dA)[0]))

    rows = {}
    for label, w in [("equal weights", np.full(3, 1 / 3)), ("constrained (learned, chain KL)", dual.weights.numpy()),
                     ("constrained, average of iterates", dual.averaged_weights.numpy()),
                     ("dual ascent on exact KL", exact_dual.weights.numpy()), ("exact μ*", mu_star)]:
        x0, chain_kl = sample_and_kl(models, w, chain, args.samples, seed=7)
        kl = product_kl(log_q, np.asarray(w)[None], dA)[0]
        rows[label] = {"weights": dict(zip(names, map(float, w))), "kl": dict(zip(names, map(float, kl))),
                       "max_kl": float(kl.max()), "chain_kl": dict(zip(names, map(float, chain_kl))),
                       "max_chain_kl": float(chain_kl.max()), "sample_mean": x0.mean(0).tolist(), "_samples": x0.numpy()}
    if args.plots:
        plot_and(args.out / "and.png", names, log_q, rows, grid, shape)
    return {"components": names, "rows": rows, "trajectory": trajectory, "train_seconds": train_s}


def run_or(args: Toy2DSettings, chain, ac, grid, dA, shape, g) -> dict:
    """OR: train one model on Σ μ_i·DSM_i with equal weights and with μ ascending on the raw and on the excess
    losses; score each against the exact min-max mixture weights; ``or.png`` with ``args.plots``."""
    names = list(OR_SETUP)
    mixes = [OR_SETUP[n] for n in names]
    eval_sets = []
    for mix in mixes:
        eval_sets.append((sample_mixture(mix, 4096, g), torch.randint(0, 1000, (4096,), generator=g), torch.randn(4096, 2, generator=g)))
    # Irreducible loss of each dataset: a model fitted on that dataset alone, on the same fixed triples.
    t0 = time.time()
    alone = [train_score([mix], lambda: [1.0], args.train_steps, g, ac) for mix in mixes]
    irreducible = np.array([fixed_losses(m, [s], ac)[0] for m, s in zip(alone, eval_sets)])
    log_q = np.stack([log_density(m, grid) for m in mixes])
    mu_star, _ = exact_minmax(mixture_kl, log_q, dA, step=0.005)

    rows = {}
    for label, variant in [("equal weights", None), ("constrained, raw DSM", "raw"), ("constrained, excess DSM", "excess")]:
        dual = SimplexDual(2, lr=args.or_lr, schedule="constant", normalize=False)
        seen = []

        def on_dual(model, dual=dual, variant=variant, seen=seen):
            losses = fixed_losses(model, eval_sets, ac)
            d = excess_loss(losses, irreducible) if variant == "excess" else losses
            if variant is not None:
                dual.step(torch.tensor(d))
            seen.append({"weights": dual.weights.tolist(), "loss": losses.tolist(), "excess": excess_loss(losses, irreducible).tolist()})

        model = train_score(mixes, lambda dual=dual: dual.weights.tolist(), args.train_steps, g, ac, on_dual=on_dual)
        tail = np.array([s["weights"] for s in seen[len(seen) // 2 :]])
        w = dual.weights.numpy()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            x0 = sample_latents(model, chain, torch.randn(args.samples, 2, generator=gen), torch.randn(len(chain), args.samples, 2, generator=gen))
        nearest = ((x0.numpy()[:, None, :] - OR_MODES[None]) ** 2).sum(2).argmin(1)
        masses = np.bincount(nearest, minlength=3) / len(nearest)
        implied = np.array([masses[0], masses[1] + masses[2]])  # the learned model's actual mixture weights
        kl_w = mixture_kl(log_q, w[None], dA)[0]
        kl_implied = mixture_kl(log_q, implied[None], dA)[0]
        rows[label] = {"weights": dict(zip(names, map(float, w))), "weights_avg_second_half": dict(zip(names, map(float, tail.mean(0)))),
                       "mode_masses": {"A (0.75,0)": float(masses[0]), "B (-0.75,+0.75)": float(masses[1]), "B (-0.75,-0.75)": float(masses[2])},
                       "kl": dict(zip(names, map(float, kl_w))), "max_kl": float(kl_w.max()),
                       "kl_of_sampled_masses": dict(zip(names, map(float, kl_implied))), "max_kl_of_sampled_masses": float(kl_implied.max()),
                       "final_loss": dict(zip(names, seen[-1]["loss"])), "final_excess_loss": dict(zip(names, seen[-1]["excess"])),
                       "_samples": x0.numpy()}
    kl = mixture_kl(log_q, mu_star[None], dA)[0]
    rows["exact μ*"] = {"weights": dict(zip(names, map(float, mu_star))), "kl": dict(zip(names, map(float, kl))), "max_kl": float(kl.max()),
                        "mode_masses": {"A (0.75,0)": float(mu_star[0]), "B (-0.75,+0.75)": float(mu_star[1] / 2), "B (-0.75,-0.75)": float(mu_star[1] / 2)}}
    if args.plots:
        plot_or(args.out / "or.png", rows)
    return {"datasets": names, "irreducible_loss": dict(zip(names, irreducible.tolist())), "rows": rows,
            "train_seconds": time.time() - t0}


def run_toy2d(settings: Toy2DSettings) -> dict:
    """Both experiments: ``{"and": ..., "or": ..., "seconds": ...}`` (entries starting with
    ``_`` hold samples, for the plots; :func:`without_samples` drops them)."""
    t0 = time.time()
    g = torch.Generator().manual_seed(settings.seed)
    scheduler = make_schedule()
    chain = DDIMChain.from_scheduler(scheduler, settings.num_inference_steps, eta=1.0)
    ac = scheduler.alphas_cumprod.float()
    grid, dA, shape = make_grid()
    results = {"and": run_and(settings, chain, ac, grid, dA, shape, g), "or": run_or(settings, chain, ac, grid, dA, shape, g)}
    results["seconds"] = time.time() - t0
    return results


def without_samples(d):
    """``d`` without the keys starting with ``_`` (the samples), at every depth: what results.json holds."""
    return {k: without_samples(v) for k, v in d.items() if not k.startswith("_")} if isinstance(d, dict) else d
