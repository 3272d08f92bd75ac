"""A measurable "pokemon-style" score for generated images (numpy + PIL only).

Two cues of the ``pokemon-style`` dataset (thick black outlines, flat pastel fills on white):

* ``outline``: the fraction of near-black pixels (max channel < ``DARK_THRESHOLD``), divided by
  ``OUTLINE_TARGET`` and clipped to 1 (dataset images have roughly 8-20% outline pixels at 64 px;
  the base domain has none);
* ``palette``: the fraction of pixels within ``PALETTE_RADIUS`` (RGB euclidean) of the dataset's
  palette (pastel fills, white background, black outline).

``style_score = 0.5 * outline + 0.5 * palette`` in [0, 1]; higher = more pokemon-style. Images are
compared at 64x64 (box-downsampled), so the score does not depend on the resolution much.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .pokemon_style import PALETTE

DARK_THRESHOLD = 70
OUTLINE_TARGET = 0.05
PALETTE_RADIUS = 45.0
SCORE_RESOLUTION = 64

_PALETTE = np.asarray(PALETTE, dtype=np.float32)


def _as_array(image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    if image.size != (SCORE_RESOLUTION, SCORE_RESOLUTION):
        image = image.resize((SCORE_RESOLUTION, SCORE_RESOLUTION), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def style_components(image) -> dict[str, float]:
    """The raw cues of one image: ``dark_fraction``, ``palette_fraction``, and the ``outline`` term."""
    arr = _as_array(image).reshape(-1, 3)
    dark = float((arr.max(axis=1) < DARK_THRESHOLD).mean())
    dist = np.sqrt(((arr[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)).min(axis=1)
    palette = float((dist < PALETTE_RADIUS).mean())
    return {"dark_fraction": dark, "palette_fraction": palette, "outline": min(1.0, dark / OUTLINE_TARGET)}


def style_score_image(image) -> float:
    """Score of one image in [0, 1] (higher = more pokemon-style)."""
    c = style_components(image)
    return 0.5 * c["outline"] + 0.5 * c["palette_fraction"]


def style_scores(images) -> list[float]:
    """Per-image scores."""
    return [style_score_image(im) for im in images]


def style_score(images) -> float:
    """Mean score over ``images`` (a list of PIL images or HxWx3 uint8 arrays)."""
    images = list(images)
    if not images:
        raise ValueError("style_score needs at least one image")
    return float(np.mean(style_scores(images)))
