"""What the end-to-end tests of the flow-matching families (SD3, FLUX.1) share: one case per
tiny pipeline built in code, a LoRA with random weights, and a counter of transformer calls."""

from dataclasses import dataclass, field
from typing import Callable

import torch

from cdalign.models.tiny import (
    TINY_RANDOM_FLUX_ID,
    TINY_RANDOM_SD3_ID,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
)


@dataclass(frozen=True)
class FlowCase:
    """One tiny flow pipeline and the settings its runs use."""

    model_id: str
    build: Callable
    guidance_scale: float
    resolution: int | None  # None: the pipeline's own sample size
    block_prefixes: tuple[str, ...]  # where the transformer LoRA lives
    uses_cfg: bool  # False: guidance-distilled (one conditional pass per step)
    mp_flags: tuple[str, ...] = ()  # extra flags of the two-process run
    train: dict = field(default_factory=dict)  # extra tiny_config overrides


FLOW_CASES = {
    "sd3": FlowCase(TINY_RANDOM_SD3_ID, build_tiny_sd3_pipeline, 3.0, None, ("transformer_blocks.",), uses_cfg=True),
    "flux": FlowCase(TINY_RANDOM_FLUX_ID, build_tiny_flux_pipeline, 3.5, 32,
                     ("transformer_blocks.", "single_transformer_blocks."), uses_cfg=False,
                     mp_flags=("--shard",),  # the transformer sharded with FLUX's FSDP2 units
                     train=dict(num_inference_steps=4)),
}


def save_random_lora(case: FlowCase, path, seed: int, scale: float):
    """A LoRA with random A and B on ``case``'s tiny transformer, saved by cdalign's own writer."""
    from cdalign.models.lora import add_lora_adapter, save_adapter

    pipe = case.build(seed=0)
    add_lora_adapter(pipe.transformer, "x", rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(pipe.transformer, "x", path)
    return path


class CallCounter:
    """Counts the transformer's calls and the batch rows it saw (its forward wrapped)."""

    def __init__(self, transformer):
        self.transformer, self.calls, self.rows, self.guidance = transformer, 0, [], []
        self.forward = transformer.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            self.rows.append(kwargs["hidden_states"].shape[0])
            self.guidance.append(kwargs.get("guidance"))
            return self.forward(*args, **kwargs)

        self.transformer.forward = counted
        return self

    def __exit__(self, *exc):
        self.transformer.forward = self.forward
