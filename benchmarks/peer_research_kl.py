"""Row 2: a REIMPLEMENTATION, for measurement only, of how the paper's research code adds
the KL term to reward backpropagation (it is not that code, and not part of cdalign).

    python benchmarks/peer_research_kl.py MODEL_DIR --steps 8 --warmup 2

The research code (METHOD.md: "a second full UNet held in memory for the KL term")
builds on AlignProp: every denoising step runs the LoRA UNet under
``torch.utils.checkpoint`` with gradient enabled (the prediction is detached before the
last K steps), and a frozen deep copy of the base UNet, also checkpointed, predicts the
base noise at every step; the KL is the unweighted mean of ``(eps_theta - eps_ref)^2``
over steps, batch and elements (METHOD.md "uniform"). Loss = ``-mean(reward) +
lambda * KL`` with a fixed lambda. Everything else is tiny-bench (``tinybench.py``) and
follows trl's AlignProp sampler (diffusers ``DDIMScheduler.step`` with eta, noise from
the global RNG, LoRA init "gaussian"), so the difference to row 1 is the KL term."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_spec = importlib.util.spec_from_file_location("tinybench", Path(__file__).with_name("tinybench.py"))
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)


class ResearchKLStep:
    """One optimiser step: reward backprop through the last K steps + the KL to a frozen
    copy of the base UNet at every step (all UNet calls checkpointed)."""

    def __init__(self, model_dir: str, config: dict | None = None, seed: int = 0):
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from peft import LoraConfig

        c = self.c = tb.bench_config(config)
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
        self.ref_unet = copy.deepcopy(pipe.unet)  # the frozen base model, a second UNet in memory
        self.ref_unet.eval()
        pipe.unet.add_adapter(
            LoraConfig(r=c["lora_rank"], lora_alpha=c["lora_alpha"], init_lora_weights="gaussian",
                       target_modules=list(c["lora_target_modules"]))
        )
        self.params = [p for p in pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c["learning_rate"], weight_decay=c["adam_weight_decay"])
        self.pipe, self.unet = pipe, pipe.unet
        self.prompts = tb.load_prompts(model_dir)
        self._next = 0
        with torch.no_grad():
            self.neg = self._encode([""])

    def _encode(self, prompts):
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids)[0]

    def _guided(self, unet, x, t, embeds):
        import torch.utils.checkpoint as ckpt

        out = ckpt.checkpoint(unet, torch_cat([x, x]), t, embeds, use_reentrant=False)[0]
        u, cnd = out.chunk(2)
        return u + self.c["guidance_scale"] * (cnd - u)

    def __call__(self) -> dict:
        import torch

        c, pipe = self.c, self.pipe
        B, T, K = c["batch_size"], c["num_inference_steps"], c["backprop_steps"]
        prompts = [self.prompts[(self._next + k) % len(self.prompts)] for k in range(B)]
        self._next += B
        self.unet.train()
        with torch.no_grad():
            embeds = torch.cat([self.neg.expand(B, -1, -1), self._encode(prompts)])
        sched = pipe.scheduler
        sched.set_timesteps(T)
        side = pipe.unet.config.sample_size
        latents = torch.randn(B, pipe.unet.config.in_channels, side, side)
        kl = 0.0
        with torch.enable_grad():
            for i, t in enumerate(sched.timesteps):
                eps = self._guided(self.unet, latents, t, embeds)
                if i < T - K:
                    eps = eps.detach()
                eps_ref = self._guided(self.ref_unet, latents, t, embeds)
                kl = kl + (eps - eps_ref).pow(2).mean()
                latents = sched.step(eps, t, latents, eta=c["eta"]).prev_sample
            images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            images = (images / 2 + 0.5).clamp(0, 1)
            reward = tb.saturation(images)
            loss = -reward.mean() + c["kl_weight"] * kl / T
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, c["max_grad_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "kl": float(kl.detach()) / T, "reward": float(reward.detach().mean())}


def torch_cat(xs):
    import torch

    return torch.cat(xs)


def run(model_dir: str, steps: int, warmup: int, threads: int, config: dict | None = None) -> dict:
    tb.set_threads(threads)
    step = ResearchKLStep(model_dir, config)
    counter = tb.DenoiserCallCounter(step.unet, step.ref_unet)
    return tb.time_steps(step, steps, warmup, counter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tb.add_common_args(ap)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    res = run(args.model_dir, args.steps, args.warmup, args.threads, tb.parse_overrides(args.set))
    tb.emit({"row": "research_kl", **res})


if __name__ == "__main__":
    sys.exit(main())
