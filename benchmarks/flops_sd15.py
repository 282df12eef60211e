"""Counted compute of Stable Diffusion 1.5's UNet and VAE decoder at 512x512, for the GPU-hour
estimates of docs/REPRODUCE.md. Counts, not timings: the models are built from SD 1.5's
architecture on the ``meta`` device (no weights, no download) and run under
``torch.utils.flop_counter.FlopCounterMode``.

    python benchmarks/flops_sd15.py
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

# SD 1.5's unet/config.json and vae/config.json (stable-diffusion-v1-5/stable-diffusion-v1-5).
UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def count(fn) -> float:
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        fn()
    return mode.get_total_flops() / 1e12


def main() -> None:
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
        latents, text, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768), torch.tensor([500, 500])
        z = torch.randn(1, 4, 64, 64)
    cfg_call = count(lambda: unet(latents, t, encoder_hidden_states=text))  # guided: cond + uncond latents
    decode = count(lambda: vae.decode(z))
    print("| pass (one 512x512 image) | TFLOP |\n|---|---|")
    print(f"| UNet call with classifier-free guidance (batch 2) | {cfg_call:.2f} |")
    print(f"| VAE decode | {decode:.2f} |")


if __name__ == "__main__":
    main()
