"""peft adapters on a denoiser (UNet or transformer), found and switched structurally:
which parameters are an adapter's (:func:`adapter_parameters`), which adapter is active
(:func:`set_denoiser_adapter`), base-model predictions from the same weights with the adapters
off (:func:`adapters_disabled`, :class:`WithAdaptersDisabled`), and the fingerprint of the
base weights alone (:func:`model_fingerprint`)."""

from __future__ import annotations

import contextlib

import torch

from cdalign.core.sampling import GuidedDenoiser
from cdalign.runs.fingerprints import sampled_fingerprint


def _tuner_layers(module):
    """The peft tuner layers (LoRA-wrapped linears and convolutions) inside ``module``, lazily."""
    # peft is imported here, not at the top: it pulls in transformers, and `import cdalign` stays light.
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def _first_lora_layer(denoiser):
    """A peft tuner layer of ``denoiser`` (all share the adapter state set by denoiser-level calls)."""
    return next(_tuner_layers(denoiser), None)


def adapter_parameters(module, adapter: str | None = None) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``adapter`` (None: of every adapter) on ``module``, found
    structurally (the adapter's own sub-modules of each peft tuner layer, e.g. ``lora_A``
    and ``lora_B``), never by matching parameter names. In ``named_parameters`` order;
    empty for a module without adapters. Everything else is the base model."""
    ids = set()
    for layer in _tuner_layers(module):
        for attr in layer.adapter_layer_names:  # peft: the per-adapter dicts holding trainable weights
            holder = getattr(layer, attr)  # ModuleDict or ParameterDict keyed by adapter name
            for name in holder.keys() if adapter is None else [adapter]:
                if name in holder:
                    part = holder[name]
                    ids.update(map(id, part.parameters() if isinstance(part, torch.nn.Module) else [part]))
    return [p for p in module.parameters() if id(p) in ids]


def _lora_layers(denoiser) -> list:
    """``denoiser``'s peft tuner layers, found once per set of loaded adapters (a new adapter can
    wrap new modules; a reloaded one has a new config object) and kept on the denoiser: a walk of
    every module costs more than the switch it serves."""
    key = tuple(getattr(denoiser, "peft_config", {}).items())
    cached = denoiser.__dict__.get("_cdalign_lora_layers")
    if cached is None or len(cached[0]) != len(key) or any(
        a[0] != b[0] or a[1] is not b[1] for a, b in zip(cached[0], key)
    ):
        cached = (key, list(_tuner_layers(denoiser)))
        denoiser.__dict__["_cdalign_lora_layers"] = cached  # not a submodule: never in state_dict or modules()
    return cached[1]


def _enable_layers(denoiser, enabled: bool) -> None:
    """diffusers' ``enable_adapters`` / ``disable_adapters`` on the cached layers: each layer's own
    ``enable_adapters`` (peft: the active adapters' ``requires_grad`` follows)."""
    for layer in _lora_layers(denoiser):
        layer.enable_adapters(enabled)


def set_denoiser_adapter(denoiser, adapter: str | None) -> None:
    """Activate ``adapter`` alone on ``denoiser`` (None: all adapters off, the base model).

    The state each peft layer ends in is that of diffusers' ``enable_adapters()`` then
    ``set_adapters([adapter])``: ``adapter`` active and trainable, every other adapter's
    weights frozen, its scale at weight 1. It is set on the cached layers (:func:`_lora_layers`),
    not through diffusers' walks of every module (8.2 → 2.7 ms a switch on the tiny UNet,
    ``benchmarks/what_if_cpu_kernels.py --adapter_switch``); an unchanged state is kept."""
    if not getattr(denoiser, "_hf_peft_config_loaded", False):
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} is not loaded on this denoiser (it has no adapters)")
        return
    layer = _first_lora_layer(denoiser)
    if adapter is None:
        if layer is None or not layer.disable_adapters:
            _enable_layers(denoiser, False)
        return
    if adapter not in denoiser.peft_config:
        raise ValueError(f"adapter {adapter!r} is not loaded; loaded adapters: {', '.join(denoiser.peft_config)}")
    if layer is not None and not layer.disable_adapters and list(layer.active_adapters) == [adapter]:
        return
    for lora in _lora_layers(denoiser):
        lora.set_adapter([adapter])
        if lora.disable_adapters:
            lora.enable_adapters(True)  # re-applies the (now single) active adapter's requires_grad
        lora.set_scale(adapter, 1.0)


@contextlib.contextmanager
def adapters_disabled(denoiser):
    """Base-model predictions from the *same* denoiser: the LoRA adapters are switched off
    inside the block (never a second copy in memory), and back on after it."""
    has_adapters = getattr(denoiser, "_hf_peft_config_loaded", False)
    layer = _first_lora_layer(denoiser) if has_adapters else None
    switch = layer is not None and not layer.disable_adapters
    if switch:
        _enable_layers(denoiser, False)
    try:
        yield denoiser
    finally:
        if switch:
            _enable_layers(denoiser, True)


class WithAdaptersDisabled:
    """Wrap a predictor so that it runs with its denoiser's adapters disabled."""

    def __init__(self, predictor: GuidedDenoiser):
        self.predictor = predictor

    def __call__(self, x_t, t):
        with adapters_disabled(self.predictor.model):
            return self.predictor(x_t, t)


def model_fingerprint(denoiser) -> str:
    """Identifies base weights for the normalisation cache, whatever their source: every
    parameter except those of adapters (told apart structurally, see
    :func:`adapter_parameters`), so adding a LoRA leaves it unchanged."""
    adapters = {id(p) for p in adapter_parameters(denoiser)}
    return sampled_fingerprint([(name, p) for name, p in denoiser.named_parameters() if id(p) not in adapters])
