"""What identifies a reward, a model's weights and a prompt list across runs: short,
stable hashes for cache keys (the normalisation cache, :mod:`cdalign.runs.normalization_cache`).

The reward part of a key is :func:`reward_identity`: the registry name, its kwargs, a
fingerprint of its weights and one of the source file that defines it (a changed formula
is a different reward: its cached statistics are not reused). A reward given as a user object (``rewards={"saturation":
my_fn}``) is identified only if it carries a ``cache_key`` attribute (any string; change
it whenever the function changes); without one it cannot be recognised again. A reward scored by a
server is its configured name, ``cache_key`` and encoding, wherever the server runs. (The base
weights' fingerprint, which leaves adapters out: ``cdalign.models.adapters.model_fingerprint``.)"""

from __future__ import annotations

import hashlib
import inspect
import json

import torch


def sampled_fingerprint(named_tensors) -> str:
    """A hash of ``(name, tensor)`` pairs from about 64 evenly spaced entries per tensor:
    cheap on large models, and it changes when weights are retrained or swapped."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda item: item[0]):
        flat = t.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def callable_name(fn) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(fn).__name__)}"


def source_fingerprint(obj) -> str | None:
    """A hash of the source file that defines ``obj``'s class (or ``obj`` itself, for a
    function): it changes when the code that computes a reward changes. None where the
    source cannot be read (a built-in, an interactive definition)."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    try:
        path = inspect.getsourcefile(target)
        return None if path is None else hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
    except (TypeError, OSError):
        return None


def reward_identity(name: str, reward, *, kwargs: dict | None = None, user: bool = False) -> dict | None:
    """What a reward *is*, for cache keys. Registry rewards (``user=False``): name, kwargs,
    class, a fingerprint of its weights (``state_dict``) and of its defining source file. User objects: their
    ``cache_key`` attribute (plus the weights if it is a module), or None when they have
    none: such a reward cannot be recognised again and must not be cached. A reward scored by a
    server (it has a ``remote_identity()`` method, :class:`cdalign.rewards.remote.RemoteReward`):
    its configured name, ``cache_key`` and encoding, not its URL (None without a ``cache_key``)."""
    remote = getattr(reward, "remote_identity", None)
    if callable(remote):
        return remote()
    weights = None
    if isinstance(reward, torch.nn.Module):
        tensors = [(k, v) for k, v in reward.state_dict().items() if torch.is_tensor(v) and v.numel() > 0]
        weights = sampled_fingerprint(tensors) if tensors else None
    if not user:
        return {"registry": name, "kwargs": dict(kwargs or {}), "class": callable_name(reward), "weights": weights,
                "code": source_fingerprint(reward)}
    key = getattr(reward, "cache_key", None)
    if key is None:
        return None
    return {"user": callable_name(reward), "cache_key": str(key), "weights": weights}


def cache_key(fields: dict) -> str:
    """A stable hash of the JSON-serialisable ``fields`` (reward, model, prompts, sampler)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def prompts_fingerprint(prompts: list[str]) -> str:
    """A hash of the prompt list, in order (the prompts' part of a cache key)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
