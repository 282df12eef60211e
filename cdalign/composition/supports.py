"""Support labelers of the OR (mixture) experiment: which dataset's support a sample falls in.

A mixture of datasets with disjoint supports has an exact min-max forward-KL answer (equal
masses; METHOD.md §2, OR), so the mass a trained model puts in each support, counted by a
classifier that needs no learned model, checks the method. A labeler says which dataset
columns name a sample's cell (e.g. colour and shape) and how to read that cell back from
a generated image; a dataset's support is the set of its rows' cells."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cdalign.data.shapes import classify_image
from cdalign.registry import Registry


@dataclass(frozen=True)
class SupportLabeler:
    """``columns``: the dataset columns naming a row's cell; ``read(image (H,W,3) uint8)``:
    the same cell read back from a generated image (a tuple in the order of ``columns``)."""

    columns: tuple[str, ...]
    read: Callable[[np.ndarray], tuple]


def _read_shapes_cell(image: np.ndarray) -> tuple:
    seen = classify_image(image)
    return (seen["color"], seen["shape"])


SUPPORT_LABELERS: Registry[SupportLabeler] = Registry("support labeler")
# The shapes world (cdalign/tiny-shapes-sd): a cell is (colour, shape), read by the numpy classifier.
SUPPORT_LABELERS.register("shapes", SupportLabeler(("color", "shape"), _read_shapes_cell))
