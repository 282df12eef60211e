"""Where every random draw of a run comes from.

All randomness is derived from the run's seed and a position (what for, which batch), not
from a global RNG state: a resumed run, a run on N processes and a single-process run of
the same global batch draw the same prompts, seeds and truncation lengths."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

# Purposes: the second part of ``derived_seed(seed, purpose, ...)``, one per kind of draw,
# so that no two kinds share a stream. The integers are part of every run's results:
# changing one changes what a seed draws (e.g. the default recipe's λ trajectory).
TRAIN_BATCH = 0  # trainer: prompts, image seeds, truncation K of each optimiser step (…, index)
NORMALIZATION_BATCH = 1  # trainer: base-model samples for the reward statistics (…, batch)
EVAL_ITEMS = 2  # the evaluation images (seed, EVAL_ITEMS, image index)
LORA_INIT = 3  # trainer: the LoRA's random A matrices
COMPOSITION_DUAL_BATCH = 10  # composer: the batch of dual step k (…, k)
DISTILL_LORA_INIT = 21  # distillation: the student LoRA's A matrices
DISTILL_BATCH = 30  # distillation: prompts, seeds and steps of optimiser step k (…, k)
MIXTURE_EVAL_TRIPLES = 40  # mixture: fixed (image, t, noise) triples of dataset i (…, i)
MIXTURE_ALONE_LORA_INIT = 50  # mixture: + i, the LoRA fitted on dataset i alone (irreducible loss; i < 10)
MIXTURE_ALONE_BATCH = 60  # mixture: + i, its training batches (…, step)
MIXTURE_LORA_INIT = 70  # mixture: the mixture LoRA
MIXTURE_TRAIN_BATCH = 80  # mixture: its training batches (…, step)
MIXTURE_MASS_SAMPLES = 90  # mixture: the images whose support masses are counted (…, image index)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, processes and platforms)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def batch_share(
    seed: int, purpose: int, index: int, prompts: list[str], size: int, num_processes: int = 1, process_index: int = 0
) -> tuple[list[str], list[int], torch.Generator]:
    """This process's ``size`` prompts and image seeds of global batch ``index`` (of
    ``size × num_processes`` draws fixed by ``(seed, purpose, index)``), and the generator
    after those draws (for further draws every process must agree on)."""
    g = torch.Generator().manual_seed(derived_seed(seed, purpose, index))
    total = size * num_processes
    idx = torch.randint(0, len(prompts), (total,), generator=g).tolist()
    seeds = torch.randint(0, 2**62, (total,), generator=g).tolist()
    lo, hi = process_index * size, (process_index + 1) * size
    return [prompts[i] for i in idx[lo:hi]], seeds[lo:hi], g


def grouped_batch_share(
    seed: int, purpose: int, index: int, prompts: list[str], size: int, group: int,
    num_processes: int = 1, process_index: int = 0,
) -> tuple[list[str], list[int], torch.Generator]:
    """:func:`batch_share` with the global batch drawn as prompt groups: ``size × num_processes
    / group`` prompts, each shown on ``group`` consecutive images with their own seeds
    (``size`` a multiple of ``group``, so a group never spans two processes). ``group = 1``
    is :func:`batch_share` itself (the same draws)."""
    if group == 1:
        return batch_share(seed, purpose, index, prompts, size, num_processes, process_index)
    if size % group:
        raise ValueError(f"batch size {size} is not a multiple of the prompt group size {group}")
    g = torch.Generator().manual_seed(derived_seed(seed, purpose, index))
    total = size * num_processes
    idx = torch.randint(0, len(prompts), (total // group,), generator=g).repeat_interleave(group).tolist()
    seeds = torch.randint(0, 2**62, (total,), generator=g).tolist()
    lo, hi = process_index * size, (process_index + 1) * size
    return [prompts[i] for i in idx[lo:hi]], seeds[lo:hi], g


def evaluation_items(prompts: Sequence[str], num_images: int, seed: int) -> list[tuple[str, int]]:
    """The (prompt, image seed) of each of ``num_images`` evaluation images: the prompts in
    turn (image k shows ``prompts[k % len(prompts)]``) and image k's seed
    ``derived_seed(seed, EVAL_ITEMS, k)``. The one item scheme of the trainer's report, the
    evaluation harness and the composer: the same prompts, count and seed give the same
    images' noise, and the first n items are the same for any count >= n."""
    if num_images > 0 and not prompts:
        raise ValueError("evaluation needs at least one prompt")
    return [(prompts[k % len(prompts)], derived_seed(seed, EVAL_ITEMS, k)) for k in range(num_images)]
