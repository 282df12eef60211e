"""Does a flow model keep a shape it is handed? (``evaluation/shape_retention.py``) Fresh
shapes-world scenes (:mod:`cdalign.data.shapes`) are encoded with the model's VAE (posterior
mean), mixed with noise to flow time ``s`` (``x_s = (1 - s) x0 + s eps``, rectified flow) and
finished by the pipeline's own sampler (``StableDiffusion3Pipeline.__call__`` with
``latents=x_s`` and ``sigmas`` from ``s`` down) from the scene's full caption; the numpy shapes
classifier reads the shape of each result. ``s = 0`` is the VAE's own round trip (the ceiling);
``s = 1`` is plain generation.

The scheduler applies its time ``shift`` to the ``sigmas`` it is given, so the start is passed
unshifted (:func:`unshifted`) and spaced as the model's own schedule: the first step runs at
exactly ``s``, whatever the model's shift. Schedulers with dynamic shifting are refused."""

from __future__ import annotations

import numpy as np
import torch

from cdalign.data import shapes


def unshifted(s: float, shift: float) -> float:
    """The ``u`` that ``FlowMatchEulerDiscreteScheduler`` with a fixed ``shift`` maps to ``s``
    (the inverse of ``shift u / (1 + (shift - 1) u)``)."""
    return s / (shift - (shift - 1) * s)


def retention(pipe, scenes_seed: int, num_images: int, sigmas: list[float], steps: int, guidance: float) -> dict:
    """{s: {shape: fraction, "all": fraction}} for scenes drawn from ``scenes_seed``."""
    scenes = shapes.sample_scenes(np.random.default_rng(scenes_seed), num_images)
    records = shapes.scene_records(scenes)
    pixels = torch.from_numpy(shapes.render_scenes(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pipe.vae
    with torch.no_grad():
        x0 = (vae.encode(pixels.to(pipe.device)).latent_dist.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(scenes_seed)).to(x0.device)
    if pipe.scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError(f"{type(pipe.scheduler).__name__} uses dynamic shifting: a start time needs the pipeline's mu")
    shift = float(pipe.scheduler.config.get("shift", 1.0))
    out = {}
    for s in sigmas:
        if s <= 0:
            with torch.no_grad():
                decoded = vae.decode(x0 / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
            images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
        else:
            n = max(1, round(s * steps))
            u0 = unshifted(s, shift)
            images = pipe(
                [r["prompt"] for r in records],
                latents=(1 - s) * x0 + s * noise,
                sigmas=list(np.linspace(u0, u0 / n, n)),
                guidance_scale=guidance,
                output_type="np",
            ).images
            images = (images * 255).round().astype(np.uint8)
            if abs(float(pipe.scheduler.sigmas[0]) - s) > 1e-5:
                raise RuntimeError(f"the sampler started at {float(pipe.scheduler.sigmas[0]):.4f}, not at s = {s}")
        hits: dict[str, list[bool]] = {}
        for image, record in zip(images, records):
            hits.setdefault(record["shape"], []).append(shapes.classify_image(image)["shape"] == record["shape"])
        out[s] = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
        out[s]["all"] = float(np.mean([h for v in hits.values() for h in v]))
    return out
