"""Row 5: the floor: only the network passes that tiny-bench needs, timed alone.

    python benchmarks/floor.py MODEL_DIR --steps 8 --warmup 2 [--kl]

Per optimiser step, with the LoRA UNet (r=4, alpha 4, to_q/to_k/to_v/to_out.0) and fixed
inputs (no sampler logic, no text encoder, no scheduler, no reward bookkeeping):
16 classifier-free-guided UNet forwards (batch 2x4) under ``no_grad``; 4 guided forwards
with gradient, chained by one elementwise update each so the backward runs through all
four as in a sampler; the VAE decode; mean saturation; one backward; one AdamW step.

``--kl`` adds what the chain-KL term needs at minimum (value at every step, gradient
where it flows): a base-model (adapter disabled) guided forward at each of the 20 steps,
no-grad at the first 16 and with gradient w.r.t. its input at the last 4.

What-if variants (not what cdalign does today; they price a possible change):
``--merged``: the LoRA is merged into the frozen weights for the 16 no-grad forwards
(and unmerged for the 4 with gradient), so those forwards cost a plain UNet's;
``--kl-value-steps m``: the base prediction only at the 4 gradient steps and m of the
others (as cdalign's ``kl_value_steps``); ``--no-base-grad``: the base prediction at the
gradient steps runs without gradient (a stop-gradient on eps_base: a different
estimator, which saves the backward passes through the base model); ``--joint``: each
base prediction shares one UNet call with the policy's at the same step (both CFG halves of
both models in a batch of 4x, peft's mixed-adapter batch: the LoRA rows ``default``, the
base rows ``__base__``), the same values and gradients in half the calls."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_spec = importlib.util.spec_from_file_location("tinybench", Path(__file__).with_name("tinybench.py"))
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)


class FloorStep:
    def __init__(self, model_dir: str, kl: bool = False, config: dict | None = None, seed: int = 0,
                 merged: bool = False, kl_value_steps: int | None = None, base_grad: bool = True,
                 joint: bool = False):
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        c = self.c = tb.bench_config(config)
        self.kl, self.merged, self.kl_value_steps, self.base_grad = kl, merged, kl_value_steps, base_grad
        if joint and not (kl and base_grad and not merged):
            raise ValueError("--joint: needs --kl, with the base gradient and without --merged (one call holds both)")
        self.joint = joint
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        for m in (self.unet, self.vae):
            m.requires_grad_(False)
            m.eval()
        torch.manual_seed(seed)
        self.unet.add_adapter(
            LoraConfig(r=c["lora_rank"], lora_alpha=c["lora_alpha"], init_lora_weights=True,
                       target_modules=list(c["lora_target_modules"]))
        )
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c["learning_rate"], weight_decay=c["adam_weight_decay"])
        sched = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        sched.set_timesteps(c["num_inference_steps"])
        self.timesteps = sched.timesteps
        B, side = c["batch_size"], self.unet.config.sample_size
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(B, self.unet.config.in_channels, side, side, generator=g)
        dim = self.unet.config.cross_attention_dim
        self.embeds = torch.randn(2 * B, 77, dim, generator=g)

    def _guided(self, x):
        import torch

        out = self.unet(torch.cat([x, x]), self._t, encoder_hidden_states=self.embeds).sample
        u, cnd = out.chunk(2)
        return u + self.c["guidance_scale"] * (cnd - u)

    def _base(self, x):
        self.unet.disable_adapters()
        try:
            return self._guided(x)
        finally:
            self.unet.enable_adapters()

    def _joint(self, x):
        """Policy and base guided predictions at ``x`` from one call of 4 × batch rows."""
        import torch

        B, g = x.shape[0], self.c["guidance_scale"]
        names = ["default"] * (2 * B) + ["__base__"] * (2 * B)

        def inject(module, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        hooks = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in self._lora_layers()]
        try:
            out = self.unet(torch.cat([x, x, x, x]), self._t,
                            encoder_hidden_states=torch.cat([self.embeds, self.embeds])).sample
        finally:
            for h in hooks:
                h.remove()
        pu, pc, bu, bc = out.chunk(4)
        return pu + g * (pc - pu), bu + g * (bc - bu)

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        if not hasattr(self, "_layers"):
            self._layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]
        return self._layers

    def __call__(self):
        import torch

        c = self.c
        T, K = c["num_inference_steps"], c["backprop_steps"]
        value_steps = set(range(T - K)) if self.kl_value_steps is None else set(range(min(self.kl_value_steps, T - K)))
        kl = 0.0
        with torch.no_grad():
            if self.merged:
                for layer in self._lora_layers():
                    layer.merge()
            for i in range(T - K):
                self._t = self.timesteps[i]
                if self.joint and i in value_steps:
                    eps, ref = self._joint(self.x)
                    kl += float((eps - ref).pow(2).mean())
                    continue
                eps = self._guided(self.x)
                if self.kl and i in value_steps:
                    kl += float((eps - self._base(self.x)).pow(2).mean())
            if self.merged:
                for layer in self._lora_layers():
                    layer.unmerge()
        x = self.x
        for i in range(T - K, T):
            self._t = self.timesteps[i]
            if self.joint:
                eps, ref = self._joint(x)
                kl = kl + (eps - ref).pow(2).mean()
                x = x - 0.05 * eps
                continue
            eps = self._guided(x)
            if self.kl:
                with torch.set_grad_enabled(self.base_grad):
                    ref = self._base(x)
                kl = kl + (eps - ref).pow(2).mean()
            x = x - 0.05 * eps
        images = (self.vae.decode(x / self.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        loss = -tb.saturation(images).mean() + (c["kl_weight"] * kl / T if self.kl else 0.0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run(model_dir: str, steps: int, warmup: int, threads: int, kl: bool = False, config: dict | None = None, **variant) -> dict:
    tb.set_threads(threads)
    step = FloorStep(model_dir, kl=kl, config=config, **variant)
    counter = tb.DenoiserCallCounter(step.unet)
    return tb.time_steps(step, steps, warmup, counter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tb.add_common_args(ap)
    ap.add_argument("--kl", action="store_true", help="add the chain-KL passes (base model at every step)")
    ap.add_argument("--merged", action="store_true", help="what-if: LoRA merged for the no-grad forwards")
    ap.add_argument("--kl-value-steps", type=int, default=None, help="what-if: base at the gradient steps + m others")
    ap.add_argument("--no-base-grad", action="store_true", help="what-if: no gradient through the base prediction")
    ap.add_argument("--joint", action="store_true", help="what-if: policy and base predictions in one call per step")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    variant = dict(merged=args.merged, kl_value_steps=args.kl_value_steps, base_grad=not args.no_base_grad,
                   joint=args.joint)
    res = run(args.model_dir, args.steps, args.warmup, args.threads, args.kl, tb.parse_overrides(args.set), **variant)
    tb.emit({"row": "floor_kl" if args.kl else "floor", "variant": variant, **res})


if __name__ == "__main__":
    sys.exit(main())
