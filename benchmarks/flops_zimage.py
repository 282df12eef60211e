"""Counted compute and activation memory of Z-Image's transformer and VAE decoder (1024x1024 by default),
for the time and memory estimates in ``recipes/zimage/multi_reward.yaml``: Z-Image-Turbo's
architecture (``ZImageTransformer2DModel``'s defaults are its config: dim 3840, 30 layers + 2
noise- and 2 context-refiner layers, patch 2 on 16 VAE channels; FLUX.1's VAE) on the ``meta``
device, counted as ``benchmarks/flops_sdxl.py`` counts SDXL (same caveats: the memory is an upper
bound, attention by the math kernel).

    python benchmarks/flops_zimage.py                    # 1024 px
    python benchmarks/flops_zimage.py --resolution 512   # the recipe's size
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from flops_sdxl import count, saved_gib

VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
CAPTION_TOKENS = 64  # a prompt of ~40 words in the chat template (padded to a multiple of 32)


def main(resolution: int) -> None:
    bf16, side = torch.bfloat16, resolution // 8
    with torch.device("meta"):
        transformer, vae = ZImageTransformer2DModel(), AutoencoderKL(**{**VAE, "sample_size": resolution})
        x = [torch.randn(16, 1, side, side)]
        t, caption = torch.tensor([0.5]), [torch.randn(CAPTION_TOKENS, 2560)]
        z = torch.randn(1, 16, side, side)
    params = sum(p.numel() for p in transformer.parameters()) / 1e9
    call = count(lambda: transformer(x, t, caption, return_dict=False))
    decode = count(lambda: vae.decode(z))
    transformer, vae = transformer.to(bf16).requires_grad_(False), vae.to(bf16).requires_grad_(False)
    mem = saved_gib(lambda: transformer([x[0].to(bf16).requires_grad_(True)], t.to(bf16), [caption[0].to(bf16)],
                                        return_dict=False))
    vae_mem = saved_gib(lambda: vae.decode(z.to(bf16).requires_grad_(True)))
    print(f"Z-Image transformer: {params:.3f} B parameters")
    print(f"| pass (one {resolution}x{resolution} image) | TFLOP | saved for backward, bf16: all / without attention matrices (GiB, "
          "upper bounds) |\n|---|---|---|")
    print(f"| transformer call, one conditional pass (batch 1) | {call:.2f} | {mem[0]:.1f} / {mem[1]:.1f} |")
    print(f"| VAE decode | {decode:.2f} | {vae_mem[0]:.1f} / {vae_mem[1]:.1f} |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024, help="image side in pixels (a multiple of 16)")
    main(ap.parse_args().resolution)
