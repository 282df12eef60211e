"""Composition on the shapes world, judged by the numpy classifier: the concept minimum
(``shapes_match``, min over concepts), concept composition over several sets with the joint
prompt baseline, the reward and pairwise-KL tables, and the OR support masses."""

import json

import numpy as np
import pytest
import torch

import cdalign
from cdalign.composition import run_concept_sets
from cdalign.composition.config import config_from_dict, parse_config
from cdalign.composition.mixture import (
    MixtureTrainer,
    dataset_support,
    support_masses,
    write_demo_shapes_datasets,
)
from cdalign.composition.supports import SUPPORT_LABELERS
from cdalign.publishing.composition_tables import concept_table, mass_table, pairwise_table, reward_table
from cdalign.data.shapes import (
    BACKGROUND_NAMES,
    COLOR_NAMES,
    SHAPES,
    SIZES,
    prompt_match,
    render_scenes,
    write_shapes_folder,
)
from cdalign.rewards import build_reward


def scenes_of(specs):
    """Rendered 64 px images (n, H, W, 3) of (colour, shape, background) triples, large, centred."""
    n = len(specs)
    scenes = dict(
        color=np.array([COLOR_NAMES.index(c) for c, _, _ in specs]),
        shape=np.array([SHAPES.index(s) for _, s, _ in specs]),
        background=np.array([BACKGROUND_NAMES.index(b) for _, _, b in specs]),
        size=np.full(n, SIZES.index("large")), radius=np.full(n, 16), x=np.full(n, 32), y=np.full(n, 32),
        jitter=np.zeros((n, 2, 3), dtype=np.int64),
    )
    return render_scenes(scenes)


def as_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def test_concept_minimum_on_hand_made_images():
    images = scenes_of([("red", "square", "black"), ("red", "circle", "black"), ("blue", "square", "white")])
    concepts = ["a red shape", "a square", "on a black background"]
    reward = build_reward("shapes_match")
    assert reward.differentiable is False
    per_concept = torch.stack([reward(as_tensor(images), [c] * 3) for c in concepts])
    assert per_concept.tolist() == [[1, 1, 0], [1, 0, 1], [1, 1, 0]]
    # the concept minimum: 1 only where the image shows every concept
    assert per_concept.min(0).values.tolist() == [1.0, 0.0, 0.0]
    # a full caption is judged on all its words; a prompt naming nothing is NaN
    assert prompt_match(images[0], "a large red square on a black background") == 1.0
    assert prompt_match(images[0], "a small red square") == 0.0
    assert np.isnan(prompt_match(images[0], "a photo"))


def test_support_masses_of_rendered_images_of_known_composition(tmp_path):
    narrow, broad = write_demo_shapes_datasets(tmp_path, n=12)
    spec = config_from_dict({"composition": "or", "datasets": [{"name": "narrow", "source": str(narrow)},
                                                                {"name": "broad", "source": str(broad)}]}).datasets
    labeler = SUPPORT_LABELERS.get("shapes")
    supports = {d.name: dataset_support(d, labeler) for d in spec}
    assert supports["narrow"] == {("red", "circle")}
    assert supports["broad"] <= {(c, s) for c in COLOR_NAMES if c != "red" for s in SHAPES}
    assert not supports["narrow"] & supports["broad"]
    # 3 red circles, 5 blue squares, 2 red squares (in neither support), read back by the classifier
    images = scenes_of([("red", "circle", "white")] * 3 + [("blue", "square", "gray")] * 5 + [("red", "square", "black")] * 2)
    cells = [labeler.read(img) for img in images]
    supports["broad"] = supports["broad"] | {("blue", "square")}  # 12 random rows may miss it
    masses = support_masses(cells, supports)
    assert masses["narrow"]["mass"] == pytest.approx(0.3) and masses["broad"]["mass"] == pytest.approx(0.5)
    assert masses["outside_every_support"]["mass"] == pytest.approx(0.2)
    assert masses["narrow"]["minus_log_mass"] == pytest.approx(-np.log(0.3))
    lo, hi = masses["broad"]["ci95"]
    assert lo < 0.5 < hi


def test_shapes_folder_refuses_unknown_values(tmp_path):
    with pytest.raises(ValueError, match=r"colors: \['pink'\] must be a non-empty subset"):
        write_shapes_folder(tmp_path / "x", 2, colors=["pink"])


def test_dataset_without_support_columns_is_refused_before_training(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
        (tmp_path / name / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": ""}) + "\n")
    cfg = config_from_dict({"composition": "or", "support_labeler": "shapes", "resolution": 32,
                            "datasets": [{"name": "a", "source": str(tmp_path / "a")}, {"name": "b", "source": str(tmp_path / "b")}],
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"datasets\[a\].*no column\(s\) \['color', 'shape'\].*write_shapes_folder"):
        MixtureTrainer(cfg)


def test_mixture_counts_support_masses_end_to_end(tmp_path):
    narrow, broad = write_demo_shapes_datasets(tmp_path / "data", n=8)
    cfg = config_from_dict({
        "composition": "or", "datasets": [{"name": "narrow", "source": str(narrow)}, {"name": "broad", "source": str(broad)}],
        "resolution": 32, "max_steps": 2, "dual_every": 1, "train_batch_size": 2, "eval_size": 4,
        "irreducible_fit_steps": 1, "num_inference_steps": 2, "num_grid_images": 1, "support_labeler": "shapes",
        "mass_samples": 6, "output_dir": str(tmp_path / "run"), "dual": {"lr": 0.1, "normalize": True},
    })
    report = MixtureTrainer(cfg).train()
    m = report["masses"]
    assert m["n"] == 6 and m["min_max_answer"] == {"narrow": 0.5, "broad": 0.5}
    for model in ("base", "mixture"):
        total = m[model]["narrow"]["mass"] + m[model]["broad"]["mass"] + m[model]["outside_every_support"]["mass"]
        assert total == pytest.approx(1.0)
    assert "| exact min-max (disjoint supports) | 0.500 | 0.500 | 0 |" in mass_table(report)
    assert (tmp_path / "run" / "samples_mass.png").is_file()


def concept_config(tmp_path, **over):
    d = {
        "components": [{"name": "colour", "kind": "concept", "prompt": "a red shape", "reward": "shapes_match"},
                       {"name": "shape", "kind": "concept", "prompt": "a square", "reward": "shapes_match"}],
        "concept_sets": [{"prompts": ["a red shape", "a square"], "joint_prompt": "a red square"},
                         {"prompts": ["a blue shape", "a circle"], "joint_prompt": "a blue circle"}],
        "prompts": "shapes", "num_inference_steps": 2, "resolution": 32, "guidance_scale": 3.0, "kl_estimator": "uniform",
        "dual": {"steps": 2, "batch_size": 2, "lr": 0.3, "normalize": True},
        "eval_batches": 1, "num_grid_images": 2, "output_dir": str(tmp_path / "concepts"),
    }
    d.update(over)
    return config_from_dict(d)


def test_concept_sets_are_checked_against_the_concept_components(tmp_path):
    with pytest.raises(ValueError, match=r"concept_sets\[0\]\.prompts: 1 prompts for 2 'concept' components"):
        concept_config(tmp_path, concept_sets=[{"prompts": ["a red shape"]}])


def test_concept_composition_over_sets_pools_the_concept_minimum(tmp_path):
    report = run_concept_sets(concept_config(tmp_path))
    out = tmp_path / "concepts"
    for f in ("report.json", "concepts.md", "samples.png", "config.yaml", "set_0/report.json", "set_1/samples.png"):
        assert (out / f).is_file(), f
    assert len(report["sets"]) == 2 and report["num_eval_images_per_set"] == 2
    for s in report["sets"]:
        assert sum(s["weights"].values()) == pytest.approx(1.0) and min(s["weights"].values()) >= 0
        assert set(s["min_over_concepts"]) == {"equal_weights", "constrained", "joint_prompt"}
    assert report["pooled"]["constrained"]["n"] == 4
    # the pooled mean is the mean of the per-set per-image minima (equal image counts per set)
    per_set = [s["min_over_concepts"]["constrained"]["mean"] for s in report["sets"]]
    assert report["pooled"]["constrained"]["mean"] == pytest.approx(sum(per_set) / 2)
    assert set(report["paired_differences"]) == {"constrained − equal_weights", "constrained − joint_prompt"}
    assert "**pooled** (4 images)" in concept_table(report)
    # each set's run: the joint prompt is a model of its own, with its KL to every concept
    one = json.loads((out / "set_0" / "report.json").read_text())
    joint = one["models"]["joint_prompt"]
    assert joint["prompt"] == "a red square" and set(joint["kl"]) == {"colour", "shape"}
    assert one["pairwise_kl"]["colour"]["colour"] == pytest.approx(0.0, abs=1e-12)
    assert "| colour (shapes_match) |" in reward_table(one) and "| sampled alone" in pairwise_table(one)


def test_tiny_recipes_parse():
    adapters = parse_config(["--config", "compose/tiny_adapters"])  # a packaged recipe, by name
    assert adapters.pretrained_model_name_or_path == "cdalign/tiny-shapes-sd"
    assert [c.name for c in adapters.components] == ["brightness", "colorfulness", "contrast", "base"]
    flow = parse_config(["--config", "cdalign/recipes_data/compose/tiny_flow_adapters.yaml"])
    assert flow.pretrained_model_name_or_path == "cdalign/tiny-shapes-sd3" and flow.eta == 0.7
    assert [c.name for c in flow.components] == ["brightness", "colorfulness", "base"]
    for c in flow.components[:2]:  # each adapter recipe trains on the composition's base model
        adapter = cdalign.parse_config(["--config", c.train_recipe])  # resolved against the recipe
        assert adapter.pretrained_model_name_or_path == flow.pretrained_model_name_or_path
        assert adapter.objective.reward == c.reward and adapter.output_dir == c.source
    concepts = parse_config(["--config", "compose/tiny_concepts"])
    assert len(concepts.concept_sets) == 6 and all(c.reward == "shapes_match" for c in concepts.components)
    mixture = parse_config(["--config", "cdalign/recipes_data/compose/tiny_mixture.yaml"])
    assert mixture.support_labeler == "shapes" and mixture.pretrained_model_name_or_path == "cdalign/tiny-shapes-sd"
