"""What the end-to-end tests of every model family share (``test_family_end_to_end.py``): one
case per registered pipeline class (SD 1.x, SDXL, SD3, FLUX.1), each a tiny random pipeline
built in code, a LoRA with random weights, and a counter of denoiser calls."""

from dataclasses import dataclass, field
from typing import Callable

import torch

from cdalign.core.families import family_of
from cdalign.models.tiny import (
    TINY_RANDOM_FLUX_ID,
    TINY_RANDOM_ID,
    TINY_RANDOM_SD3_ID,
    TINY_RANDOM_SDXL_ID,
    TINY_RANDOM_ZIMAGE_ID,
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_zimage_pipeline,
)

UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


@dataclass(frozen=True)
class FamilyCase:
    """One tiny pipeline of a family and the settings its runs use."""

    pipeline_class: str  # the MODEL_FAMILIES key it exercises
    model_id: str
    build: Callable
    guidance_scale: float
    resolution: int | None  # None: the pipeline's own sample size
    block_prefixes: tuple[str, ...]  # where the denoiser's LoRA lives
    uses_cfg: bool  # False: guidance-distilled (one conditional pass per step)
    mp_flags: tuple[str, ...] = ()  # extra flags of the two-process run
    two_processes: bool = True  # False: tests/test_distributed.py covers it already
    sharded_resume: bool = False  # the sharded exact-resume run (SD 1.x: tests/test_resume.py)
    train: dict = field(default_factory=dict)  # extra tiny_config overrides


FAMILY_CASES = {
    "sd": FamilyCase("StableDiffusionPipeline", TINY_RANDOM_ID, build_tiny_pipeline, 3.0, 32, UNET_BLOCKS,
                     uses_cfg=True, two_processes=False),
    "sdxl": FamilyCase("StableDiffusionXLPipeline", TINY_RANDOM_SDXL_ID, build_tiny_sdxl_pipeline, 3.0, 32, UNET_BLOCKS,
                       uses_cfg=True, mp_flags=("--shard",), sharded_resume=True),  # the UNet sharded: its FSDP2 units
    "sd3": FamilyCase("StableDiffusion3Pipeline", TINY_RANDOM_SD3_ID, build_tiny_sd3_pipeline, 3.0, None,
                      ("transformer_blocks.",), uses_cfg=True, sharded_resume=True),
    "flux": FamilyCase("FluxPipeline", TINY_RANDOM_FLUX_ID, build_tiny_flux_pipeline, 3.5, 32,
                       ("transformer_blocks.", "single_transformer_blocks."), uses_cfg=False,
                       mp_flags=("--shard",),  # the transformer sharded with FLUX's FSDP2 units
                       train=dict(num_inference_steps=4)),
    "zimage": FamilyCase("ZImagePipeline", TINY_RANDOM_ZIMAGE_ID, build_tiny_zimage_pipeline, 3.0, 32,
                         ("noise_refiner.", "context_refiner.", "layers."), uses_cfg=True,
                         mp_flags=("--shard",)),  # the transformer sharded with its refiner and main layers
}


def denoiser(pipe):
    """The pipeline's UNet or transformer."""
    return family_of(pipe).denoiser_of(pipe)


def save_random_lora(case: FamilyCase, path, seed: int, scale: float):
    """A LoRA with random A and B on ``case``'s tiny denoiser, saved by cdalign's own writer."""
    from cdalign.models.lora import add_lora_adapter, save_adapter

    model = denoiser(case.build(seed=0))
    add_lora_adapter(model, "x", rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(model, "x", path)
    return path


class CallCounter:
    """Counts the denoiser's calls and the batch rows it saw (its forward wrapped): a UNet
    takes the latents first, a transformer as ``hidden_states``, Z-Image's as a list of rows."""

    def __init__(self, model):
        self.model, self.calls, self.rows, self.guidance = model, 0, [], []
        self.forward = model.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else kwargs["sample"])
            self.rows.append(len(x) if isinstance(x, list) else x.shape[0])
            self.guidance.append(kwargs.get("guidance"))
            return self.forward(*args, **kwargs)

        self.model.forward = counted
        return self

    def __exit__(self, *exc):
        self.model.forward = self.forward
