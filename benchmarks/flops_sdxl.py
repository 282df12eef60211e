"""Counted compute and activation memory of SDXL base's UNet and VAE decoder at 1024x1024, for
the time and memory estimates in ``recipes/sdxl/multi_reward.yaml``. Counts, not timings: the
models are built from SDXL base's architecture on the ``meta`` device (no weights, no download)
and run under ``torch.utils.flop_counter.FlopCounterMode`` (as ``benchmarks/flops_sd15.py`` does
for SD 1.5) and, for memory, under autograd's saved-tensor hooks in bf16 with frozen weights and a
latent that needs its gradient (what a checkpointed UNet call of the trainer holds during its
backward). The memory is an upper bound: every saved tensor is summed (one kept by two
operations counts twice), and attention runs by the math kernel on ``meta``, which keeps the
attention matrices that a GPU's flash or memory-efficient kernel does not.

    python benchmarks/flops_sdxl.py
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json and vae/config.json (the keys that differ
# from diffusers' defaults).
UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           scaling_factor=0.13025, force_upcast=True)


def count(fn) -> float:
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        fn()
    return mode.get_total_flops() / 1e12


def is_attention_matrix(t: torch.Tensor) -> bool:
    """A (batch, heads, N, N) attention matrix (N >= 1024 tokens, at most 64 heads), which the
    math kernel keeps and a GPU's flash or memory-efficient kernel does not."""
    return t.dim() == 4 and t.shape[-1] == t.shape[-2] >= 1024 and t.shape[1] <= 64


def saved_gib(fn) -> tuple[float, float]:
    """GiB of the tensors autograd saves for the backward of ``fn()`` (summed, see above): all
    of them, and those that are not attention matrices (:func:`is_attention_matrix`)."""
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), is_attention_matrix(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for n, _ in sizes) / 2**30, sum(n for n, attn in sizes if not attn) / 2**30


def main() -> None:
    bf16 = torch.bfloat16
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
        latents, text, t = torch.randn(2, 4, 128, 128), torch.randn(2, 77, 2048), torch.tensor([500, 500])
        added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
        z = torch.randn(1, 4, 128, 128)
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    cfg_call = count(lambda: unet(latents, t, encoder_hidden_states=text, added_cond_kwargs=added))  # cond + uncond
    decode = count(lambda: vae.decode(z))
    unet, vae = unet.to(bf16).requires_grad_(False), vae.to(bf16).requires_grad_(False)
    added = {k: v.to(bf16) for k, v in added.items()}
    unet_mem = saved_gib(lambda: unet(latents.to(bf16).requires_grad_(True), t, encoder_hidden_states=text.to(bf16),
                                      added_cond_kwargs=added))
    vae_mem = saved_gib(lambda: vae.decode(z.to(bf16).requires_grad_(True)))
    print(f"SDXL base UNet: {params:.3f} B parameters")
    print("| pass (one 1024x1024 image) | TFLOP | saved for backward, bf16: all / without attention matrices (GiB, "
          "upper bounds) |\n|---|---|---|")
    print(f"| UNet call with classifier-free guidance (batch 2) | {cfg_call:.2f} | {unet_mem[0]:.1f} / {unet_mem[1]:.1f} |")
    print(f"| VAE decode | {decode:.2f} | {vae_mem[0]:.1f} / {vae_mem[1]:.1f} |")


if __name__ == "__main__":
    main()
