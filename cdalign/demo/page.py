"""The demo's page (``demo/app.py``, a Hugging Face Space): two tabs, aligned vs base and
composition, on a :class:`~cdalign.demo.engine.DemoEngine`; :func:`build_demo` builds it.
Everything the page computes is the engine's; its Markdown is
:mod:`cdalign.publishing.demo_markdown`. Needs the ``demo`` extra (gradio)."""

from __future__ import annotations

import functools
import logging
import math

import gradio as gr
import numpy as np

from cdalign.core.kl import KL_ESTIMATORS
from cdalign.demo.catalog import DemoError, Limits
from cdalign.demo.engine import MODEL, WEIGHT_MODES, DemoEngine
from cdalign.publishing.demo_markdown import compose_markdown, constraint_markdown, kl_line
from cdalign.publishing.tables import md

logger = logging.getLogger("cdalign.demo")
MAX_COMPONENTS = Limits().max_adapters + 1  # the adapters and the base model: one weight slider each
DISPLAY_SIDE = 256  # images are shown enlarged (nearest neighbour: the tiny model's pixels stay sharp)
# One row of up to 4 images per model; PNG, so what the page shows is exactly what was sampled.
GALLERY = dict(columns=4, rows=1, height=240, object_fit="contain", format="png", preview=False)
DEFAULT_PROMPT = "a purple circle on a black background"  # a held-out prompt where the shipped LoRAs show
DEFAULT_COMPOSITION = ["demo: colorful", "demo: muted"]  # two requirements that pull apart

INTRO = f"""# cdalign: constrained alignment and composition, live

The embedded tiny model [`{MODEL}`](https://arxiv.org/abs/2508.19104) draws coloured shapes. Its LoRAs
were trained by cdalign to **stay as close as possible to the base model while a requirement holds**
(e.g. colourfulness ≥ +0.75 base-model σ). **Aligned vs base** shows what a LoRA changes on the same
seeds and whether its requirements hold on these images; **Composition** combines LoRAs as the product
ε_ω = Σ ω_i ε̃_i with equal, manual or **constrained** weights (a few dual-ascent steps that raise the
weight of whichever component the composed model is farthest from, measured by the chain KL)."""


def page_errors(fn):
    """Errors reach the page as one sentence (``gr.Error``), never as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DemoError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as err:  # a bug or an exhausted machine: logged here, a sentence there
            logger.exception("request failed")
            raise gr.Error(f"The request failed unexpectedly ({type(err).__name__}); try again with fewer images or "
                           "steps, and report it if it happens again.", print_exception=False) from None

    return wrapper


def _enlarge(image: np.ndarray) -> np.ndarray:
    k = max(1, DISPLAY_SIDE // image.shape[0])
    return image.repeat(k, axis=0).repeat(k, axis=1)


def _gallery(images, seeds):
    return [(_enlarge(img), f"seed {s}") for img, s in zip(images, seeds)]


def _finite(value):
    """JSON for the browser: NaN/inf (e.g. the slack of a component without a threshold) become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _progress(progress):
    return lambda fraction, desc: progress(fraction, desc=desc)


def build_demo(engine: DemoEngine) -> gr.Blocks:
    """The page: two tabs (aligned vs base; composition) on ``engine``."""
    L = engine.limits
    choices = engine.catalog.choices()
    shipped = engine.catalog.shipped()
    first = shipped[0] if shipped else (choices[0] if choices else None)
    examples = engine.example_prompts
    default = examples.index(DEFAULT_PROMPT) if DEFAULT_PROMPT in examples else 0
    lora_info = "a LoRA shipped with the demo, a run found in the runs folder, or a Hub id typed as owner/name@revision"

    @page_errors
    def run_compare(lora, prompt, seed, steps, images, progress=gr.Progress()):
        r = engine.compare(lora, prompt, seed, steps, images, progress=_progress(progress))
        numbers = _finite({k: v for k, v in r.items() if k not in ("base_images", "aligned_images", "snippet", "card_table")})
        return (_gallery(r["base_images"], r["seeds"]), _gallery(r["aligned_images"], r["seeds"]),
                constraint_markdown(r["constraints"], len(r["seeds"])) + kl_line(r["kl_to_base"])
                + "".join(f"\n\n_Note: {md(note)}._" for note in r["notes"]), r["card_table"],
                r["snippet"], numbers)

    @page_errors
    def run_compose(loras, include_base, mode, prompt, seed, steps, images, kl_estimator, dual_steps, dual_lr, distill,
                    distill_steps, *manual, progress=gr.Progress()):
        r = engine.compose(loras, include_base, mode, prompt, seed, steps, images, manual=manual, dual_steps=dual_steps,
                           dual_lr=dual_lr, distill_steps=distill_steps if distill else 0, kl_estimator=kl_estimator,
                           progress=_progress(progress))
        numbers = _finite({k: v for k, v in r.items() if k not in ("images", "snippet", "kl_plot")})
        galleries = [_gallery(r["images"][key], r["seeds"]) if key in r["images"] else None
                     for key in (mode, "equal", "distilled")]
        if mode == "equal":
            galleries[1] = None
        lora = r["distilled"]["lora"] if "distilled" in r else None
        return (*galleries, compose_markdown(r), r["kl_plot"], r["snippet"], lora, numbers)

    def weight_sliders(loras, include_base, mode):
        """One slider per component, labelled with it, shown in 'manual' mode only."""
        names = [x for x in (loras or []) if isinstance(x, str) and x.strip()] + (["base model"] if include_base else [])
        return [gr.update(visible=mode == "manual" and k < len(names),
                          label=f"weight: {names[k]}" if k < len(names) else "weight") for k in range(MAX_COMPONENTS)]

    with gr.Blocks(title="cdalign: constrained alignment and composition") as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Aligned vs base"):
            with gr.Row():
                with gr.Column(scale=1):
                    a_lora = gr.Dropdown(choices, value=first, label="LoRA", info=lora_info, allow_custom_value=True)
                    a_prompt = gr.Textbox(examples[default], label="prompt", max_length=L.max_prompt_chars, max_lines=1)
                    a_examples = gr.Dropdown(examples, value=None, label="or pick a held-out prompt")
                    with gr.Row():
                        a_seed = gr.Number(0, label="seed", precision=0, minimum=0, maximum=L.max_seed)
                        a_images = gr.Slider(1, L.max_images, 4, step=1, label="images")
                    a_steps = gr.Slider(1, L.max_steps, 10, step=1, label="DDIM steps")
                    a_run = gr.Button("Generate", variant="primary", elem_id="compare-run")
                with gr.Column(scale=2):
                    a_base = gr.Gallery(label="base model", elem_id="base-gallery", **GALLERY)
                    a_aligned = gr.Gallery(label="aligned (this LoRA), same seeds", elem_id="aligned-gallery", **GALLERY)
                    a_live = gr.Markdown(label="constraints on these images")
                    with gr.Accordion("the LoRA's model card: constraints on its held-out evaluation", open=True):
                        a_card = gr.Markdown(label="model card constraint table")
                    with gr.Accordion("use it with diffusers", open=False):
                        a_code = gr.Code(language="python", label="diffusers snippet")
                    with gr.Accordion("all numbers (JSON)", open=False):
                        a_json = gr.JSON(label="numbers")
            a_examples.change(lambda p: p or gr.skip(), a_examples, a_prompt, queue=False, api_visibility="private")
            a_outputs = [a_base, a_aligned, a_live, a_card, a_code, a_json]
            a_run.click(run_compare, [a_lora, a_prompt, a_seed, a_steps, a_images], a_outputs, concurrency_limit=2,
                        concurrency_id="pipeline", api_name="compare")

        with gr.Tab("Composition"):
            with gr.Row():
                with gr.Column(scale=1):
                    pair = [x for x in DEFAULT_COMPOSITION if x in shipped] or shipped[:2]
                    c_loras = gr.Dropdown(choices, value=pair, multiselect=True, allow_custom_value=True,
                                          label=f"LoRAs to compose (2–{L.max_adapters})", info=lora_info)
                    c_base = gr.Checkbox(True, label="include the base model as a component")
                    c_mode = gr.Radio(list(WEIGHT_MODES.names()), value="constrained", label="weights",
                                      info="equal: 1/n; manual: the sliders, normalised to sum 1; constrained: dual "
                                           "ascent on the chain KL to each component, computed now")
                    sliders = [gr.Slider(0, 1, 0.5, step=0.01, label="weight", visible=False) for _ in range(MAX_COMPONENTS)]
                    with gr.Accordion("constrained weights: dual ascent", open=False):
                        c_kl = gr.Radio(list(KL_ESTIMATORS.names()), value="path", label="chain KL estimator",
                                        info="path: the exact chain KL in nats (its last, nearly noiseless step weighs "
                                             "most); uniform: the paper code's unweighted mean of squared ε differences")
                        c_dual_steps = gr.Slider(1, L.max_dual_steps, 4, step=1, label="dual steps")
                        c_dual_lr = gr.Slider(0.05, 1.0, 0.3, step=0.05, label="step size η (weight moved per step)")
                    with gr.Accordion("distil into one LoRA", open=False):
                        c_distill = gr.Checkbox(False, label="distil the composed model into a single LoRA (slow on a "
                                                "CPU: several seconds per step)")
                        c_distill_steps = gr.Slider(1, L.max_distill_steps, 10, step=1, label="distillation steps")
                    c_prompt = gr.Textbox(examples[default], label="prompt", max_length=L.max_prompt_chars, max_lines=1)
                    with gr.Row():
                        c_seed = gr.Number(0, label="seed", precision=0, minimum=0, maximum=L.max_seed)
                        c_images = gr.Slider(1, L.max_images, 4, step=1, label="images")
                    c_steps = gr.Slider(1, L.max_steps, 10, step=1, label="DDIM steps")
                    c_run = gr.Button("Compose", variant="primary", elem_id="compose-run")
                with gr.Column(scale=2):
                    c_chosen = gr.Gallery(label="composed, your weights", elem_id="composed-gallery", **GALLERY)
                    c_equal = gr.Gallery(label="equal weights (baseline)", **GALLERY)
                    c_table = gr.Markdown(label="weights and KL per component")
                    c_plot = gr.Image(label="KL to each component", type="filepath")
                    c_distilled_gallery = gr.Gallery(label="distilled LoRA", visible=False, **GALLERY)
                    c_file = gr.File(label="distilled LoRA (diffusers format)", visible=False)
                    with gr.Accordion("use it with diffusers (set_adapters)", open=False):
                        c_code = gr.Code(language="python", label="set_adapters snippet")
                    with gr.Accordion("all numbers (JSON)", open=False):
                        c_json = gr.JSON(label="numbers")
            c_distill.change(lambda on: [gr.update(visible=on)] * 2, c_distill, [c_distilled_gallery, c_file], queue=False,
                             api_visibility="private")
            for trigger in (c_loras.change, c_base.change, c_mode.change, demo.load):
                trigger(weight_sliders, [c_loras, c_base, c_mode], sliders, queue=False, api_visibility="private")
            c_outputs = [c_chosen, c_equal, c_distilled_gallery, c_table, c_plot, c_code, c_file, c_json]
            c_run.click(run_compose, [c_loras, c_base, c_mode, c_prompt, c_seed, c_steps, c_images, c_kl, c_dual_steps,
                                      c_dual_lr, c_distill, c_distill_steps, *sliders],
                        c_outputs, concurrency_limit=2, concurrency_id="pipeline", api_name="compose")

        @page_errors
        def on_load(request: gr.Request, progress=gr.Progress()):
            """``?example=K`` runs held-out prompt K with the first shipped LoRA on opening (a link
            that shows a result at once); without it the page waits for a click."""
            key = (request.query_params.get("example") if request is not None else None)
            if key is None:
                return [gr.skip()] * (3 + len(a_outputs))
            index = int(key) if key.isdigit() and int(key) < len(examples) else default
            outs = run_compare(first, examples[index], 0, 10, L.max_images, progress=progress)
            return [first, examples[index], 0, *outs]

        demo.load(on_load, None, [a_lora, a_prompt, a_seed, *a_outputs], concurrency_id="pipeline",
                  api_visibility="private")
    demo.queue(max_size=L.queue_size, default_concurrency_limit=2)
    return demo
