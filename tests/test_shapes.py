"""The shapes world: seeded scenes, captions that say what is drawn, and a numpy
classifier that reads the drawing back."""

import numpy as np
import pytest

from cdalign.data import shapes


def _scenes(n=300, seed=0):
    return shapes.sample_scenes(np.random.default_rng(seed), n)


def test_scenes_are_deterministic_for_a_seed():
    a, b, c = _scenes(seed=3), _scenes(seed=3), _scenes(seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x"], c["x"])
    assert np.array_equal(shapes.render_scenes(a), shapes.render_scenes(b))


def test_scenes_cover_every_word_and_stay_inside_the_image():
    scenes = _scenes(n=600)
    assert set(scenes["shape"]) == set(range(len(shapes.SHAPES)))
    assert set(scenes["color"]) == set(range(len(shapes.COLORS)))
    assert set(scenes["background"]) == set(range(len(shapes.BACKGROUNDS)))
    assert (scenes["x"] - scenes["radius"] >= 0).all()
    assert (scenes["x"] + scenes["radius"] < shapes.IMAGE_SIZE).all()
    assert (scenes["y"] - scenes["radius"] >= 0).all()
    assert (scenes["y"] + scenes["radius"] < shapes.IMAGE_SIZE).all()


def test_render_gives_uint8_images_of_the_declared_size():
    images = shapes.render_scenes(_scenes(n=4))
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8


def test_caption_names_exactly_the_scene():
    assert shapes.caption("circle", "red", "small", "blue") == "a small red circle on a blue background"
    assert shapes.caption("square", "green") == "a green square"
    for record in shapes.scene_records(_scenes(n=50)):
        words = record["prompt"].split()
        assert {record["shape"], record["color"], record["size"], record["background"]} <= set(words)
        assert shapes.parse_prompt(record["prompt"]) == {k: record[k] for k in ("shape", "color", "size", "background")}


def test_parse_prompt_tells_foreground_from_background_colour():
    parsed = shapes.parse_prompt("A large Blue triangle on a white background.")
    assert parsed == dict(shape="triangle", color="blue", size="large", background="white")
    assert shapes.parse_prompt("an astronaut riding a horse") == dict(shape=None, color=None, size=None, background=None)


def test_numpy_classifier_reads_ground_truth_images_back():
    scenes = _scenes(n=600, seed=1)
    images = shapes.render_scenes(scenes)
    records = shapes.scene_records(scenes)
    for key in ("color", "shape", "background", "size"):
        accuracy = np.mean([shapes.classify_image(im)[key] == r[key] for im, r in zip(images, records)])
        assert accuracy >= 0.99, (key, accuracy)


def test_classifier_on_an_empty_image_finds_no_shape():
    blank = np.full((64, 64, 3), 245, np.uint8)
    seen = shapes.classify_image(blank)
    assert seen["color"] is None and seen["shape"] is None and seen["background"] == "white"


def test_palette_colours_are_far_apart():
    colors = np.array(list(shapes.COLORS.values()) + list(shapes.BACKGROUNDS.values()), float)
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert distances[~np.eye(len(colors), dtype=bool)].min() > 100


def test_dataset_is_deterministic_and_structured(tmp_path):
    datasets = pytest.importorskip("datasets")
    a = shapes.shapes_dataset(24, seed=5, cache_dir=str(tmp_path / "a"))
    b = shapes.shapes_dataset(24, seed=5, cache_dir=str(tmp_path / "b"))
    assert isinstance(a, datasets.Dataset) and len(a) == 24
    assert set(a.column_names) == {"image", "prompt", "shape", "color", "background", "size", "x", "y", "radius"}
    assert a["prompt"] == b["prompt"]
    row = a[0]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(b[0]["image"]))
    assert np.asarray(row["image"]).shape == (64, 64, 3)
    names = a.features["color"].names
    assert names[row["color"]] in row["prompt"].split()
    seen = shapes.classify_image(np.asarray(row["image"]))
    assert seen["color"] == names[row["color"]]
