"""Where every random draw of a run comes from.

All randomness is derived from the run's seed and a position (what for, which batch), not
from a global RNG state: a resumed run, a run on N processes and a single-process run of
the same global batch draw the same prompts, seeds and truncation lengths."""

from __future__ import annotations

import hashlib

import torch


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


def eval_batch_share(
    eval_seed: int, index: int, prompts: list[str], size: int, num_processes: int = 1, process_index: int = 0
) -> tuple[list[str], list[int]]:
    """Evaluation batch ``index``: prompts drawn from ``eval_seed``, image seeds numbered
    consecutively, so every checkpoint compared with this seed sees the same images' noise."""
    g = torch.Generator().manual_seed(derived_seed(eval_seed, 2, index))
    total = size * num_processes
    idx = torch.randint(0, len(prompts), (total,), generator=g).tolist()
    lo = process_index * size
    first = eval_seed * 100003 + index * total + lo
    return [prompts[i] for i in idx[lo : lo + size]], [first + k for k in range(size)]
