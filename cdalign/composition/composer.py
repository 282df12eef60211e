"""ConstrainedComposer: AND (product) composition with constrained weights (METHOD.md §2).

    minimise_{p,t} t   s.t.  KL(p‖q_i) ≤ t   (and KL(p‖q_j) ≤ b_j for thresholded j)

over p_μ ∝ Π q_i^{μ_i}, i.e. ε_μ = Σ μ_i ε̃_i. Each dual step samples p_μ with the shared
:class:`~cdalign.core.sampling.DiffusionSampler`, estimates KL(p_μ‖q_i) for every i along that
path with ``cdalign.core.kl`` (no extra denoiser call: the ε̃_i are the terms of ε_μ), and updates
μ ← Proj_simplex(μ + η_k·KL). Evaluation compares the learned weights with equal weights
(and the distilled LoRA, if any) on the same items, through the one scoring path
(:func:`cdalign.evaluation.scoring.score_checkpoints`, the harness's and the trainer's): the
harness's ``kind: composed`` checkpoint at the same weights reports the same numbers."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cdalign.alignment.config import parse_config as parse_align_config
from cdalign.alignment.trainer import ConstrainedDDPOTrainer
from cdalign.composition.components import (
    BASE,
    Component,
    ComponentSet,
    load_lora_component,
    lora_component_path,
)
from cdalign.composition.config import ComposeConfig, save_config
from cdalign.composition.distill import CompositionDistiller
from cdalign.composition.evaluation_kind import ComposedModel, DistilledModel
from cdalign.composition.plotting import plot_divergence_bars, plot_weight_trajectory
from cdalign.composition.simplex import SimplexDual
from cdalign.console import CdalignWarning
from cdalign.core.families import freeze_pipeline
from cdalign.core.problem import KL, Constraint
from cdalign.core.sampling import DiffusionSampler
from cdalign.core.seeding import COMPOSITION_DUAL_BATCH, batch_share, evaluation_items, per_process
from cdalign.core.statistics import paired_max_mean_difference, summarize
from cdalign.data.prompt_sets import load_prompts
from cdalign.evaluation.scoring import (
    CheckpointScores,
    LoadedCheckpoint,
    score_checkpoints,
)
from cdalign.fields import check_mixed_precision, check_output_dir_writable
from cdalign.models.lora import LORA_WEIGHT_NAME, is_local_source
from cdalign.models.pipeline import load_pipeline, precision_dtype
from cdalign.publishing.plotting import save_grid
from cdalign.rewards import REWARDS
from cdalign.runs import distributed
from cdalign.runs.atomic import atomic_write_text
from cdalign.runs.folders import RunFolder
from cdalign.runs.lock import release_run_lock
from cdalign.runs.report import REPORT_FILE

logger = logging.getLogger(__name__)
RUN_FOLDER = RunFolder(markers=(REPORT_FILE, "weights.json"), what="a composition run")


def check_composition_inputs(config: ComposeConfig, accelerator=None) -> None:
    """What can be checked before any training or model loading, so that bad input fails in
    seconds: ``mixed_precision`` on this device, ``output_dir``, and every local LoRA
    component's weights file (present and complete, or to be trained by its ``train_recipe``)."""
    check_mixed_precision(config.mixed_precision, (accelerator or distributed.process_state(distributed.DEFAULT_TIMEOUT_S)).device)
    check_output_dir_writable(config.output_dir)
    for spec in config.components:
        if not spec.component_kind.lora or not is_local_source(spec.source):
            continue
        weights = Path(spec.source) / (spec.weight_name or LORA_WEIGHT_NAME)
        if spec.train_recipe and not weights.is_file():
            continue  # trained by train_missing_components
        lora_component_path(spec.name, spec.source, spec.weight_name)


def train_missing_components(config: ComposeConfig, accelerator=None) -> list[str]:
    """Train every LoRA component that has a ``train_recipe`` and no LoRA in ``source``
    yet, with ``recipes/align.py``'s trainer on this run's base model. Returns the names
    trained (an existing LoRA is reused, never retrained). Every input, and every
    component's recipe, is checked before the first component trains."""

    check_composition_inputs(config, accelerator)
    todo = []
    for i, c in enumerate(config.components):
        if not c.component_kind.lora or not c.train_recipe or (Path(c.source) / (c.weight_name or LORA_WEIGHT_NAME)).is_file():
            continue
        argv = [
            "--config", c.train_recipe,
            "--pretrained_model_name_or_path", config.pretrained_model_name_or_path,
            "--output_dir", c.source,
            "--overwrite_output_dir", "true",
            *c.train_overrides,
        ]
        try:
            todo.append((c, parse_align_config(argv)))
        except ValueError as err:
            raise ValueError(f"components[{i}].train_recipe / train_overrides: {err}") from None
    trained = []
    for c, align_cfg in todo:
        logger.info("training component %s into %s", c.name, c.source)
        ConstrainedDDPOTrainer(align_cfg, accelerator=accelerator).train()
        trained.append(c.name)
    return trained


class ConstrainedComposer:
    """AND composition of the components of ``config`` on one base pipeline.

    Args:
        config: a :class:`~cdalign.composition.config.ComposeConfig`.
        pipeline: a loaded ``StableDiffusionPipeline`` (its adapters are added to), or None.
        prompts / eval_prompts: lists overriding ``config.prompts`` / ``config.eval_prompts``.
        accelerator: an ``accelerate.Accelerator`` (one is made if None).
    """

    def __init__(self, config: ComposeConfig, pipeline=None, prompts=None, eval_prompts=None, accelerator=None):
        config.validate()
        self.config = cfg = config
        self.output_dir = Path(cfg.output_dir)
        RUN_FOLDER.check(self.output_dir, fresh=not cfg.overwrite_output_dir)
        check_mixed_precision(cfg.mixed_precision, (accelerator or distributed.process_state(distributed.DEFAULT_TIMEOUT_S)).device)
        for spec in cfg.components:  # a missing or corrupt local LoRA fails before the base model loads
            if spec.component_kind.lora and is_local_source(spec.source):
                lora_component_path(spec.name, spec.source, spec.weight_name)
        self.accelerator = accelerator or distributed.make_accelerator(distributed.DEFAULT_TIMEOUT_S,
                                                                       mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device
        dtype = precision_dtype(cfg.mixed_precision)
        self.pipe = pipeline if pipeline is not None else load_pipeline(
            cfg.pretrained_model_name_or_path, revision=cfg.revision, torch_dtype=dtype, variant=cfg.variant
        )
        freeze_pipeline(self.pipe)
        comps = []
        for spec in cfg.components:
            kind = spec.component_kind
            if kind.lora:
                load_lora_component(self.pipe, spec.name, spec.source, spec.weight_name, spec.revision)
            comps.append(kind(spec.name, spec.prompt))
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.sampler = DiffusionSampler(self.pipe, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, self.device)
        self.components = ComponentSet(self.sampler, comps)
        self.names = self.components.names
        self.dual = SimplexDual(
            len(comps), cfg.dual.lr, cfg.dual.schedule, [c.threshold for c in cfg.components], cfg.dual.init,
            normalize=cfg.dual.normalize,
        )
        self.prompts = load_prompts(cfg.prompts if prompts is None else prompts, cfg.prompt_column, cfg.prompt_split)
        source = eval_prompts if eval_prompts is not None else cfg.eval_prompts
        self.eval_prompts = load_prompts(source, cfg.prompt_column, cfg.prompt_split) if source is not None else self.prompts
        self.trajectory: list[dict] = []
        self.distiller = None
        self._rewards: dict[str, Callable] | None = None

    # ------------------------------------------------------------------ batches
    def _batch(self, purpose: int, index: int, prompts: list[str], size: int):
        """This process's share of a global batch of ``size`` (prompts, seeds) fixed by (seed, purpose, index)."""
        acc = self.accelerator
        share, seeds, _ = batch_share(self.config.seed, purpose, index, prompts, self._per_process(size),
                                      acc.num_processes, acc.process_index)
        return share, seeds

    def _per_process(self, size: int) -> int:
        """A global batch's share on each process (``dual.batch_size`` and ``distill.batch_size``
        are images over all processes: one recipe and seed give one run on 1 or 2 processes)."""
        return per_process(size, self.accelerator.num_processes, "dual.batch_size")

    def _eval_items(self) -> list[tuple[str, int]]:
        """(prompt, seed) of every evaluation image: ``eval_batches`` batches of
        ``dual.batch_size`` (:func:`~cdalign.core.seeding.evaluation_items` of
        ``eval_prompts`` and ``eval_seed``, as in the trainer and the harness)."""
        cfg = self.config
        return evaluation_items(self.eval_prompts, cfg.eval_batches * cfg.dual.batch_size, cfg.eval_seed)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Gather (n, B) per-sample values over processes -> (n, B_total)."""
        if self.accelerator.num_processes == 1:
            return t.cpu()
        return self.accelerator.gather(t.T.contiguous().to(self.device)).T.cpu()

    # ------------------------------------------------------------------ dual ascent
    def divergences(self, weights, prompts: Sequence[str], seeds: Sequence[int]):
        """(images, KL (n, B)) of p_ω for these prompts/seeds (this process's share)."""
        return self.components.divergences(prompts, seeds, weights, self.config.kl_estimator)

    def dual_step(self) -> dict:
        """Sample p_ω, estimate KL(p_ω‖q_i) for every i, and take one dual ascent step."""
        k = self.dual.num_steps
        prompts, seeds = self._batch(COMPOSITION_DUAL_BATCH, k, self.prompts, self.config.dual.batch_size)
        weights = self.dual.weights
        _, kl = self.divergences(weights, prompts, seeds)
        kl_mean = self._gather(kl).double().mean(1)
        self.dual.step(kl_mean)
        log = {
            "step": k,
            "weights": weights.tolist(),
            "kl": kl_mean.tolist(),
            "max_kl": float(kl_mean.max()),
            "slack": self.dual.slacks(kl_mean).tolist(),
            "new_weights": self.dual.weights.tolist(),
        }
        self.trajectory.append(log)
        return log

    def fit(self, steps: int | None = None, progress: bool = True,
            on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run the dual steps (``on_step(k, steps)`` before step k, e.g. to report progress);
        returns the learned weights ω (n,)."""
        from tqdm.auto import tqdm

        n = self.config.dual.steps if steps is None else steps
        bar = tqdm(range(n), desc="dual ascent", disable=not (progress and self.accelerator.is_main_process))
        for k in bar:
            if on_step is not None:
                on_step(k, n)
            log = self.dual_step()
            bar.set_postfix(max_kl=f"{log['max_kl']:.4g}", weights=" ".join(f"{w:.2f}" for w in log["new_weights"]))
        return self.dual.weights

    # ------------------------------------------------------------------ evaluation
    def _score(self, model: LoadedCheckpoint, rewards: dict[str, Callable]) -> CheckpointScores:
        """``model`` on the evaluation items, through the one scoring path (all processes'
        images, in item order)."""
        cfg = self.config
        return score_checkpoints(self.sampler, {"model": lambda: model}, self._eval_items(),
                                 batch_size=cfg.eval_batch_size or cfg.dual.batch_size,
                                 rewards=rewards, kl_estimator=cfg.kl_estimator)["model"]

    def _component_rewards(self) -> dict[str, Callable]:
        """``{component: reward(images, prompts) -> (B,)}`` for every component with a
        reward; each sees the prompts its component was sampled with (a concept's own
        prompt). Built once."""
        if self._rewards is None:
            built: dict[str, torch.nn.Module] = {}
            self._rewards = {}
            for spec, comp in zip(self.config.components, self.components.components):
                if not spec.reward:
                    continue
                if spec.reward not in built:
                    built[spec.reward] = REWARDS.build(spec.reward).to(self.device)
                self._rewards[spec.name] = (
                    lambda images, prompts, reward=built[spec.reward], comp=comp: reward(images, comp.prompts_for(prompts))
                )
        return self._rewards

    @torch.no_grad()
    def evaluate_weights(self, weights, label: str) -> dict:
        """KL(p_ω‖q_i) per component (mean and 95% CI) on the fixed evaluation items, and
        each component's reward on them (per image in ``_scores``)."""
        scores = self._score(ComposedModel(self.components.components, weights), self._component_rewards())
        return self._kl_entry(label, torch.as_tensor(weights, dtype=torch.float64).tolist(), scores)

    def _kl_entry(self, label, weights, scores: CheckpointScores) -> dict:
        per = {}
        for name in self.names:
            s = summarize(scores.kl[name])
            per[name] = {"mean": s["mean"], "ci95": s["ci95"]}
        means = [per[n]["mean"] for n in self.names]
        entry = {"label": label, "weights": dict(zip(self.names, weights)) if weights is not None else None, "kl": per,
                 "max_kl": max(means), "worst_component": self.names[means.index(max(means))]}
        entry["_scores"] = scores
        return entry

    @torch.no_grad()
    def _score_components(self) -> list[CheckpointScores]:
        """Each component alone on the evaluation items, scored with its own reward, with the
        chain KL from it to every other component along its path (the composed model at the
        one-hot weights: n denoiser passes per step; ``pairwise_kl`` of the report)."""
        rewards, n = self._component_rewards(), len(self.names)
        return [
            self._score(ComposedModel(self.components.components, torch.eye(n, dtype=torch.float64)[k]),
                        {comp.name: rewards[comp.name]} if comp.name in rewards else {})
            for k, comp in enumerate(self.components.components)
        ]

    @torch.no_grad()
    def evaluate_joint_prompt(self, prompt: str) -> dict:
        """The base model under the one ``prompt`` (e.g. the concepts joined into a caption):
        the baseline of concept composition, on the same items, with its chain KL to every
        component along its own path and each component's reward (on that component's prompt)."""
        joint = Component("joint prompt", adapter=BASE, prompt=prompt)
        n = len(self.names)
        weights = torch.zeros(n + 1, dtype=torch.float64)
        weights[n] = 1.0
        scores = self._score(ComposedModel([*self.components.components, joint], weights), self._component_rewards())
        entry = self._kl_entry("joint prompt", None, scores)
        entry["prompt"] = prompt
        return entry

    def _score_rewards(self, entries: dict[str, dict], singles: list[CheckpointScores]) -> dict:
        """Each component's reward on every model's evaluation images (mean, 95% CI), raw and
        relative to that component alone (the paper's metric). A component's reward sees the
        prompts that component was sampled with (a concept's own prompt).
        ``min_over_components`` (when every scored component has the same reward, so the
        values share a unit): per image the minimum over the scored components (the paper's
        concept composition score; with ``shapes_match`` 1 = the image shows every concept),
        its mean and CI, and the per-image values (to pool runs)."""
        out, per_image = {}, {key: [] for key in entries}
        for j, spec in enumerate(self.config.components):
            if not spec.reward:
                continue
            alone = summarize(singles[j].rewards[spec.name])
            single = alone["mean"]
            entry = {"reward": spec.reward, "component_alone": single, "component_alone_ci95": alone["ci95"]}
            for key, e in entries.items():
                values = e["_scores"].rewards[spec.name]
                per_image[key].append(values)
                s = summarize(values)
                entry[key] = {"mean": s["mean"], "ci95": s["ci95"], "n": s["n"],
                              "relative_to_component": s["mean"] / single if single > 0 else None}
            out[spec.name] = entry
        if len(out) > 1 and len({out[n]["reward"] for n in out}) == 1:  # a minimum only of values in one unit
            out["min_over_components"] = {}
            for key, v in per_image.items():
                values = torch.stack(v).min(0).values
                out["min_over_components"][key] = {**summarize(values), "per_image": values.tolist()}
        return out

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Dual ascent, evaluation (constrained vs equal weights, and distilled), outputs."""
        cfg, acc = self.config, self.accelerator
        main = acc.is_main_process
        if main:
            RUN_FOLDER.claim(self.output_dir, fresh=not cfg.overwrite_output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        t0 = time.time()
        learned = self.fit()
        fit_s = time.time() - t0
        n = len(self.names)
        equal = torch.full((n,), 1.0 / n, dtype=torch.float64)
        entries = {"equal_weights": self.evaluate_weights(equal, "equal weights"),
                   "constrained": self.evaluate_weights(learned, "constrained")}
        if cfg.joint_prompt:
            entries["joint_prompt"] = self.evaluate_joint_prompt(cfg.joint_prompt)
        final_kl = torch.tensor([entries["constrained"]["kl"][nm]["mean"] for nm in self.names])
        infeasible = [self.names[i] for i in self.dual.infeasible(final_kl)]
        for name in infeasible:
            warnings.warn(f"component {name!r}: KL stays above its threshold while its multiplier grows; the "
                          "threshold looks infeasible (loosen it)", CdalignWarning, stacklevel=2)
        distill_report = None
        if cfg.distill.enabled:
            distill_report = self._distill(learned, entries)
        singles = self._score_components() if (cfg.num_grid_images or any(c.reward for c in cfg.components)) else []
        report = {
            "model": cfg.pretrained_model_name_or_path,
            "components": self.names,
            "kl_estimator": cfg.kl_estimator,
            "sampler": self.sampler.settings(),
            "num_eval_images": entries["constrained"]["_scores"].n,
            "learned_weights": dict(zip(self.names, learned.tolist())),
            "multipliers": self.dual.state_dict()["multipliers"],
            "thresholds": dict(zip(self.names, [c.threshold for c in cfg.components])),
            "infeasible": infeasible,
            "dual_steps": self.trajectory,
            "dual_seconds": fit_s,
            "models": {k: {kk: vv for kk, vv in e.items() if kk != "_scores"} for k, e in entries.items()},
        }
        if singles:  # row: the component sampled alone; column: KL from it to that component
            report["pairwise_kl"] = {
                a: {b: summarize(s.kl[b])["mean"] for b in self.names} for a, s in zip(self.names, singles)
            }
        for c in cfg.components:
            if c.threshold is not None:  # KL(p_μ‖q_i) ≤ b_i, judged like every constraint
                verdict = Constraint(c.name, KL, "low", c.threshold).verdict(entries["constrained"]["_scores"].kl[c.name])
                report["models"]["constrained"]["kl"][c.name]["threshold"] = c.threshold
                report["models"]["constrained"]["kl"][c.name]["satisfied"] = verdict["satisfied"]
        # the comparison the method is about, as a verdict: constrained − equal max KL, paired over the images
        kl_of = {k: entries[k]["_scores"].kl for k in ("constrained", "equal_weights")}
        report["max_kl_difference"] = {"what": "max KL, constrained − equal weights",
                                       **paired_max_mean_difference(kl_of["constrained"], kl_of["equal_weights"])}
        if distill_report is not None:
            report["distillation"] = distill_report
        if any(c.reward for c in cfg.components):
            report["rewards"] = self._score_rewards(entries, singles)
        if main:
            self._write_outputs(report, entries, singles, learned)
        self.entries = entries  # with the per-image scores and images (``_scores``), for callers that pool runs
        release_run_lock(self.output_dir)  # the run is complete: the folder is free for the next one
        return report

    def distill(self, weights, folder: str | Path, on_step: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
        """Distil the composed model at ``weights`` into one LoRA (:class:`CompositionDistiller`,
        ``config.distill``) saved in ``folder``, and score it on the evaluation items like every
        model. ``on_step(k, steps)`` runs before step k (None: a progress bar). Returns (the
        report's record: steps, seconds, the distance to ε_ω on the first evaluation items before
        and after; the distilled model's entry: KL to each component and ``_scores``)."""
        cfg = self.config
        distiller = self.distiller = CompositionDistiller(self.components, weights, self.prompts, cfg.distill, cfg.seed,
                                                          accelerator=self.accelerator)
        first = self._eval_items()[: cfg.dual.batch_size]
        eval_p, eval_s = [p for p, _ in first], [s for _, s in first]
        before = distiller.distance(eval_p, eval_s)
        t0 = time.time()
        if on_step is None:
            distiller.train(progress=self.accelerator.is_main_process)
        else:
            for k in range(cfg.distill.steps):
                on_step(k, cfg.distill.steps)
                distiller.step()
        seconds = time.time() - t0
        after = distiller.distance(eval_p, eval_s)
        scores = self._score(DistilledModel(self.components), self._component_rewards())
        if self.accelerator.is_main_process:
            distiller.save(folder)
        record = {
            "steps": distiller.global_step,
            "seconds": seconds,
            "distance_to_composed_before": before,
            "distance_to_composed_after": after,
        }
        return record, self._kl_entry("distilled LoRA", None, scores)

    def _distill(self, learned, entries) -> dict:
        record, entries["distilled"] = self.distill(learned, self.output_dir / "distilled")
        return {**record, "lora": f"distilled/{LORA_WEIGHT_NAME}",
                "loss_history": [h["distill_loss"] for h in self.distiller.history]}

    def _write_outputs(self, report, entries, singles, learned):

        out, cfg = self.output_dir, self.config
        traj = self.trajectory
        if traj:
            weights = [t["weights"] for t in traj] + [learned.tolist()]
            kls = [t["kl"] for t in traj]
            plot_weight_trajectory(out / "weights.png", self.names, weights, kls)
            report["plots"] = ["weights.png"]
        table = {e["label"]: [e["kl"][n]["mean"] for n in self.names] for e in entries.values()}
        plot_divergence_bars(out / "kl_per_component.png", self.names, table)
        report.setdefault("plots", []).append("kl_per_component.png")
        if cfg.num_grid_images:
            k = cfg.num_grid_images
            rows = [s.images[:k].float() / 255.0 for s in singles] + [e["_scores"].images[:k].float() / 255.0
                                                                        for e in entries.values()]
            labels = self.names + [e["label"] for e in entries.values()]
            save_grid(out / "samples.png", rows, labels)
            report["sample_grid"] = "samples.png"
        weights_doc = {"components": self.names, "weights": learned.tolist(),
                       "trajectory": [t["weights"] for t in traj] + [learned.tolist()]}
        atomic_write_text(out / "weights.json", json.dumps(weights_doc, indent=2))
        atomic_write_text(out / "report.json", json.dumps(report, indent=2))

