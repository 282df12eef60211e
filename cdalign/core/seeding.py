"""Where every random draw of a run comes from.

All randomness is derived from the run's seed and a position (what for, which batch), not
from a global RNG state: a resumed run, a run on N processes and a single-process run of
the same global batch draw the same prompts, seeds and truncation lengths."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

# Purposes: the second part of ``derived_seed(seed, purpose, ...)``, one per kind of draw, so
# that no two kinds share a stream. A purpose is a name; ``seed_purpose(name, index)`` gives
# its integer, and that integer is part of every run's results (changing one changes what a
# seed draws, e.g. the default recipe's λ trajectory).
#
# The purposes that existed before purposes were named keep the integers they had then, in
# this table (name: (first integer, how many consecutive indices)), so that earlier runs
# reproduce. The table is closed: a new purpose is a new name, whose integer is derived from
# a hash of the name (and index) into [HASHED_PURPOSE_FLOOR, 2**63), which the table's
# integers (all below 100) cannot reach.
TABLED_PURPOSES: dict[str, tuple[int, int]] = {
    "train_batch": (0, 1),  # trainer: prompts, image seeds, truncation K of each optimiser step (…, index)
    "normalization_batch": (1, 1),  # trainer: base-model samples for the reward statistics (…, batch)
    "eval_items": (2, 1),  # the evaluation images (seed, EVAL_ITEMS, image index)
    "lora_init": (3, 1),  # trainer: the LoRA's random A matrices
    "composition_dual_batch": (10, 1),  # composer: the batch of dual step k (…, k)
    "distill_lora_init": (21, 1),  # distillation: the student LoRA's A matrices
    "distill_batch": (30, 1),  # distillation: prompts, seeds and steps of optimiser step k (…, k)
    "mixture_eval_triples": (40, 1),  # mixture: fixed (image, t, noise) triples of dataset i (…, i)
    "mixture_alone_lora_init": (50, 10),  # mixture: index i, the LoRA fitted on dataset i alone (irreducible loss)
    "mixture_alone_batch": (60, 10),  # mixture: index i, its training batches (…, step)
    "mixture_lora_init": (70, 1),  # mixture: the mixture LoRA
    "mixture_train_batch": (80, 1),  # mixture: its training batches (…, step)
    "mixture_mass_samples": (90, 1),  # mixture: the images whose support masses are counted (…, image index)
}
HASHED_PURPOSE_FLOOR = 2**32


def seed_purpose(name: str, index: int = 0) -> int:
    """The integer of purpose ``name`` (its ``index``-th, for a purpose with one stream per
    item, e.g. per dataset): ``first + index`` for a tabled purpose within its indices, else
    a 63-bit hash of ``"name/index"`` at or above :data:`HASHED_PURPOSE_FLOOR`."""
    if index < 0:
        raise ValueError(f"seed purpose {name!r}: index must be >= 0, got {index}")
    first, count = TABLED_PURPOSES.get(name, (None, 0))
    if index < count:
        return first + index
    h = int.from_bytes(hashlib.sha256(f"{name}/{index}".encode()).digest()[:8], "little") >> 1
    return HASHED_PURPOSE_FLOOR + h % (2**63 - HASHED_PURPOSE_FLOOR)


# The purposes under the names their callers use (``seed_purpose`` of each name, index 0).
TRAIN_BATCH = seed_purpose("train_batch")
NORMALIZATION_BATCH = seed_purpose("normalization_batch")
EVAL_ITEMS = seed_purpose("eval_items")
LORA_INIT = seed_purpose("lora_init")
COMPOSITION_DUAL_BATCH = seed_purpose("composition_dual_batch")
DISTILL_LORA_INIT = seed_purpose("distill_lora_init")
DISTILL_BATCH = seed_purpose("distill_batch")
MIXTURE_EVAL_TRIPLES = seed_purpose("mixture_eval_triples")
MIXTURE_ALONE_LORA_INIT = seed_purpose("mixture_alone_lora_init")  # + i == seed_purpose(…, i) for i < 10
MIXTURE_ALONE_BATCH = seed_purpose("mixture_alone_batch")  # + i == seed_purpose(…, i) for i < 10
MIXTURE_LORA_INIT = seed_purpose("mixture_lora_init")
MIXTURE_TRAIN_BATCH = seed_purpose("mixture_train_batch")
MIXTURE_MASS_SAMPLES = seed_purpose("mixture_mass_samples")


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


def per_process(size: int, num_processes: int, what: str = "batch size") -> int:
    """Each process's share of a global batch of ``size`` over ``num_processes``
    (``ValueError`` naming ``what`` when it does not split evenly)."""
    share, rest = divmod(size, num_processes)
    if rest or share < 1:
        raise ValueError(f"{what}: {size} images do not split evenly over {num_processes} processes; launch a number "
                         f"of processes that divides {size}, or change {what}")
    return share


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
