"""Shapes world: procedurally generated, seeded, captioned 64x64 images of one coloured
shape on a plain background, e.g. "a small red circle on a white background".

The world is small on purpose, so that a tiny text-to-image model can learn it on a CPU
and every property a prompt names can be checked with plain numpy:

- 3 shapes (circle, square, triangle), told apart by how much of their bounding box they
  fill (pi/4, 1, 1/2);
- 6 foreground colours at the corners of the RGB cube and 3 background colours (white,
  gray, black); every two of the 9 are >= 118 apart in RGB (Euclidean, 0-255 units);
- 2 sizes (small: bounding box 14-20 px, large: 28-40 px) at a uniform random position.

Three layers, each usable alone:

- ``sample_scenes(rng, n)`` draws scene parameters (a dict of arrays);
- ``render_scenes(scenes)`` draws them, vectorised in numpy (for training batches);
- ``shapes_dataset(n, seed)`` wraps both as a ``datasets.Dataset`` (columns ``image``,
  ``prompt``, ``shape``, ``color``, ``background``, ``size``, ``x``, ``y``, ``radius``),
  deterministic for a seed, so it can be pushed to the Hub as a dataset repo.

``classify_image`` is the inverse: a numpy classifier (background = border colour,
foreground colour = majority of nearest palette colours, shape = bounding-box fill
ratio) used by the quality gates and tests; it never uses a learned model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
# Foreground palette (RGB, 0-255): the six saturated corners of the RGB cube, softened
# slightly; names are single common English words so each is one token.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "cyan": (30, 205, 215),
    "purple": (160, 40, 200),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
# Half-extent of the shape's bounding box in pixels, per size: [low, high] inclusive.
SIZE_RADIUS = {"small": (7, 10), "large": (14, 20)}
SMALL_LARGE_BOUNDARY = 12.0  # px of half extent; the classifier's small/large split
# Bounding-box fill ratio of each shape (area / bbox area): ideal values, and the
# decision bounds the classifier uses. Rasterised at 64 px, anti-aliased edge pixels push
# a small triangle's measured ratio up to ~0.65 and a small circle's down to ~0.73.
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
FILL_BOUNDS = ((0.69, "triangle"), (0.9, "circle"), (float("inf"), "square"))
# Uniform per-channel jitter (RGB units) applied to every drawn colour, so the model
# sees a neighbourhood of each palette colour rather than one exact value.
COLOR_JITTER = 12
_MARGIN = 2  # pixels kept free between a shape and the image border

COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
# Every word a shapes-world caption uses (the tokenizer makes each one token).
VOCABULARY = ("a", "on", "background", *SIZES, *COLOR_NAMES, *SHAPES, *BACKGROUND_NAMES)


def caption(shape: str, color: str, size: str | None = None, background: str | None = None) -> str:
    """The caption of a scene: "a [size] <color> <shape>[ on a <background> background]".
    ``size``/``background`` of None leave that phrase out (partial captions)."""
    words = ["a"] + ([size] if size else []) + [color, shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def sample_scenes(rng: np.random.Generator, n: int, image_size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """Draw ``n`` scenes. Returns int arrays of shape (n,): ``shape``, ``color``,
    ``background``, ``size`` (indices into SHAPES, COLOR_NAMES, BACKGROUND_NAMES, SIZES),
    ``radius`` (half bounding-box extent, px), ``x``, ``y`` (bounding-box centre, px,
    0 = left/top), and ``jitter`` of shape (n, 2, 3): colour offsets (fg, bg), RGB units."""
    shape = rng.integers(0, len(SHAPES), n)
    color = rng.integers(0, len(COLORS), n)
    background = rng.integers(0, len(BACKGROUNDS), n)
    size = rng.integers(0, len(SIZES), n)
    low = np.array([SIZE_RADIUS[s][0] for s in SIZES])[size]
    high = np.array([SIZE_RADIUS[s][1] for s in SIZES])[size]
    radius = rng.integers(low, high + 1)
    # The centre is uniform over the positions that keep the shape inside the margin.
    span = image_size - 2 * (radius + _MARGIN)
    x = radius + _MARGIN + np.floor(rng.random(n) * span).astype(np.int64)
    y = radius + _MARGIN + np.floor(rng.random(n) * span).astype(np.int64)
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, (n, 2, 3))
    return dict(shape=shape, color=color, background=background, size=size, radius=radius, x=x, y=y, jitter=jitter)


def shape_coverage(scenes: dict[str, np.ndarray], image_size: int = IMAGE_SIZE, supersample: int = 2) -> np.ndarray:
    """Fraction of each pixel covered by the scene's shape, float32 (n, H, W) in [0, 1],
    estimated on a ``supersample`` x ``supersample`` sub-pixel grid (anti-aliasing)."""
    n = len(scenes["shape"])
    # Sub-pixel centres in pixel units; pixel (i, j) spans [j, j+1) x [i, i+1).
    coords = (np.arange(image_size * supersample) + 0.5) / supersample
    px = coords[None, None, :]
    py = coords[None, :, None]
    cx = scenes["x"].reshape(n, 1, 1).astype(np.float32)
    cy = scenes["y"].reshape(n, 1, 1).astype(np.float32)
    r = scenes["radius"].reshape(n, 1, 1).astype(np.float32)
    dx, dy = px - cx, py - cy
    circle = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Upward isosceles triangle filling the bounding box: apex at (cx, cy - r), base on
    # y = cy + r from cx - r to cx + r; half-width grows linearly from 0 to r.
    half_width = (dy + r) / 2
    triangle = (np.abs(dy) <= r) & (np.abs(dx) <= half_width)
    kind = scenes["shape"].reshape(n, 1, 1)
    inside = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
    s = supersample
    return inside.reshape(n, image_size, s, image_size, s).mean(axis=(2, 4), dtype=np.float32)


def render_scenes(scenes: dict[str, np.ndarray], image_size: int = IMAGE_SIZE, supersample: int = 2) -> np.ndarray:
    """Render scenes to uint8 RGB images of shape (n, H, W, 3)."""
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    fg = np.clip(palette[scenes["color"]] + scenes["jitter"][:, 0], 0, 255)
    bg = np.clip(backgrounds[scenes["background"]] + scenes["jitter"][:, 1], 0, 255)
    alpha = shape_coverage(scenes, image_size, supersample)[..., None]
    image = alpha * fg[:, None, None, :] + (1 - alpha) * bg[:, None, None, :]
    return np.round(image).astype(np.uint8)


def scene_records(scenes: dict[str, np.ndarray]) -> list[dict]:
    """Scenes as a list of plain dicts with names (not indices) and the full caption."""
    records = []
    for i in range(len(scenes["shape"])):
        shape, color = SHAPES[scenes["shape"][i]], COLOR_NAMES[scenes["color"][i]]
        size, background = SIZES[scenes["size"][i]], BACKGROUND_NAMES[scenes["background"][i]]
        records.append(
            dict(
                prompt=caption(shape, color, size, background),
                shape=shape,
                color=color,
                background=background,
                size=size,
                x=int(scenes["x"][i]),
                y=int(scenes["y"][i]),
                radius=int(scenes["radius"][i]),
            )
        )
    return records


def _generate_examples(num_examples: int, seed: int, chunk: int = 256) -> Iterator[dict]:
    """Yield dataset rows; rows depend only on (seed, index), drawn in chunks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for start in range(0, num_examples, chunk):
        scenes = sample_scenes(rng, min(chunk, num_examples - start))
        images = render_scenes(scenes)
        for image, record in zip(images, scene_records(scenes)):
            yield {"image": Image.fromarray(image), **record}


def shapes_dataset(num_examples: int = 10_000, seed: int = 0, cache_dir: str | None = None):
    """A captioned shapes-world ``datasets.Dataset`` of ``num_examples`` rows, identical
    for the same (num_examples, seed). Columns: ``image`` (PIL, 64x64 RGB), ``prompt``,
    ``shape``, ``color``, ``background``, ``size`` (names), ``x``, ``y`` (bounding-box
    centre, px), ``radius`` (half bounding-box extent, px)."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "shape": datasets.ClassLabel(names=list(SHAPES)),
            "color": datasets.ClassLabel(names=list(COLOR_NAMES)),
            "background": datasets.ClassLabel(names=list(BACKGROUND_NAMES)),
            "size": datasets.ClassLabel(names=list(SIZES)),
            "x": datasets.Value("int32"),
            "y": datasets.Value("int32"),
            "radius": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_generator(
        _generate_examples,
        gen_kwargs={"num_examples": num_examples, "seed": seed},
        features=features,
        cache_dir=cache_dir,
    )


# ---------------------------------------------------------------------------------------
# The numpy classifier: what is in an image, without any learned model.


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The shapes-world words a prompt names: keys ``shape``, ``color``, ``size``,
    ``background``; None where absent. The foreground colour is the first colour word not
    directly followed by "background"; whole words only, case-insensitive."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    found: dict[str, str | None] = dict(shape=None, color=None, size=None, background=None)
    for i, word in enumerate(words):
        before_background = i + 1 < len(words) and words[i + 1] == "background"
        if before_background and (word in BACKGROUNDS or word in COLORS):
            found["background"] = found["background"] or word
        elif word in COLORS and found["color"] is None:
            found["color"] = word
        elif word in SHAPES and found["shape"] is None:
            found["shape"] = word
        elif word in SIZES and found["size"] is None:
            found["size"] = word
    return found


def _box3(mask: np.ndarray) -> np.ndarray:
    """3x3 box sum of a 2-D array (zero padded)."""
    p = np.pad(mask.astype(np.float32), 1)
    h, w = mask.shape
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3))


def foreground_mask(image: np.ndarray, threshold: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    """Split an image (H, W, 3) uint8 into background colour and foreground mask.

    The background colour is the median of the 1-pixel border. Pixels that differ from it
    by more than ``threshold`` (RGB Euclidean distance) are surely foreground; the mask is
    then cut at half the foreground's contrast (half the 90th percentile of those
    distances), i.e. at the edge's mid-level, so that a blurred shape keeps its extent and
    corners (a fixed cut lies inside or outside the true edge depending on how far the two
    colours are apart). A 3x3 majority filter removes isolated pixels.
    Returns (background RGB float (3,), mask bool (H, W))."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(img - background, axis=-1)
    surely = distance > threshold
    if surely.sum() >= 4:
        distance_cut = min(threshold, 0.5 * float(np.percentile(distance[surely], 90)))
    else:
        distance_cut = threshold
    return background, _box3(distance > distance_cut) >= 5


def classify_image(image: np.ndarray) -> dict:
    """Read a shapes-world image (H, W, 3) uint8 back into words.

    Returns ``color`` (majority nearest palette colour over the foreground pixels),
    ``background`` (nearest background colour to the border median), ``shape`` (from
    the bounding-box fill ratio, see FILL_BOUNDS), ``fill`` (that ratio), ``area`` (foreground pixels),
    ``radius`` (half the larger bounding-box side, px), ``size`` ("small" if ``radius``
    is nearer the small range, else "large") and ``center`` (bounding-box centre (x, y),
    px). With no foreground, ``color``, ``shape``, ``size`` and ``center`` are None."""
    background, mask = foreground_mask(image)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    bg_name = BACKGROUND_NAMES[int(np.argmin(np.linalg.norm(backgrounds - background, axis=1)))]
    result = dict(
        color=None, shape=None, size=None, background=bg_name, fill=0.0, area=int(mask.sum()), radius=0.0, center=None
    )
    if mask.sum() < 4:
        return result
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    pixels = image[mask].astype(np.float32)
    nearest = np.argmin(np.linalg.norm(pixels[:, None, :] - palette[None], axis=-1), axis=1)
    result["color"] = COLOR_NAMES[int(np.bincount(nearest, minlength=len(palette)).argmax())]
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = float(mask.sum() / (height * width))
    result["fill"] = fill
    result["shape"] = next(name for bound, name in FILL_BOUNDS if fill < bound)
    result["radius"] = max(height, width) / 2
    result["size"] = "small" if result["radius"] <= SMALL_LARGE_BOUNDARY else "large"
    result["center"] = ((cols.max() + cols.min()) / 2 + 0.5, (rows.max() + rows.min()) / 2 + 0.5)
    return result


def prompt_match(image: np.ndarray, prompt: str) -> float:
    """1.0 if the classifier reads back every shapes-world property ``prompt`` names
    (colour, shape, size, background; see :func:`parse_prompt`), else 0.0; NaN if the prompt
    names none. A concept prompt such as "red" or "black background" is judged on that
    property alone; a full caption on all of its words."""
    asked = {k: v for k, v in parse_prompt(prompt).items() if v is not None}
    if not asked:
        return float("nan")
    seen = classify_image(image)
    return float(all(seen[k] == v for k, v in asked.items()))


def write_shapes_folder(path, n: int, colors=COLOR_NAMES, shapes=SHAPES, backgrounds=BACKGROUND_NAMES,
                        caption: str | None = None, seed: int = 0, image_size: int = IMAGE_SIZE):
    """Write ``n`` shapes-world scenes whose colour is in ``colors``, shape in ``shapes`` and
    background in ``backgrounds`` (uniform over each, sizes and positions as in the world) as
    PNGs with a ``metadata.jsonl`` (columns ``file_name``, ``text``, ``color``, ``shape``,
    ``background``, ``size``): a local image folder for ``datasets``' ``imagefolder``.
    ``caption``: the ``text`` of every image (e.g. "" for one shared, unconditional caption);
    None = each scene's own caption. Returns the folder."""
    from PIL import Image  # as in _generate_examples: pillow only when images are written

    for name, values, known in (("colors", colors, COLOR_NAMES), ("shapes", shapes, SHAPES),
                                ("backgrounds", backgrounds, BACKGROUND_NAMES)):
        unknown = [v for v in values if v not in known]
        if not values or unknown:
            raise ValueError(f"{name}: {list(values)} must be a non-empty subset of {list(known)}")
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, image_size)
    scenes["color"] = np.array([COLOR_NAMES.index(c) for c in rng.choice(list(colors), n)])
    scenes["shape"] = np.array([SHAPES.index(s) for s in rng.choice(list(shapes), n)])
    scenes["background"] = np.array([BACKGROUND_NAMES.index(b) for b in rng.choice(list(backgrounds), n)])
    images = render_scenes(scenes, image_size)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(scene_records(scenes)):
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
        text = record["prompt"] if caption is None else caption
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": text, "color": record["color"],
                                 "shape": record["shape"], "background": record["background"], "size": record["size"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
