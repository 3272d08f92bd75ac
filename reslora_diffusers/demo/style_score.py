"""A measurable "pokemon-style" score for generated images (numpy + PIL only).

Two cues of the ``pokemon-style`` dataset (thick black outlines, flat pastel fills on white):

* ``outline``: the fraction of near-black pixels (max channel < ``DARK_THRESHOLD``), divided by
  ``OUTLINE_TARGET`` and clipped to 1 (dataset images have roughly 8-20% outline pixels at 64 px;
  the base domain has none);
* ``palette``: the fraction of pixels within ``PALETTE_RADIUS`` (RGB euclidean) of the dataset's
  palette (pastel fills, white background, black outline).

``style_score = 0.5 * outline + 0.5 * palette`` in [0, 1]; higher = more pokemon-style. Images are
compared at 64x64 (box-downsampled), so the score does not depend on the resolution much. On 200
dataset images and 200 base-style images (``base_style_sample``, 64 px, seed 0) every dataset image
scores above every base-style image (dataset 0.788-0.974, mean 0.946; base style 0.000-0.036, mean 0.008).

A content check, ``fill_colour_match(image, colour_name)``: the fraction of the creature's fill
pixels whose hue is nearest the prompt's colour word, for both styles (see ``fill_pixels``).
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


# ---------------------------------------------------------------------------------------------
# Content check: does the creature's fill have the prompt's colour?
# ---------------------------------------------------------------------------------------------

from .pokemon_style import PASTEL_COLORS, SATURATED_COLORS  # noqa: E402


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of an (N, 3) float array in [0, 255]."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    mx, mn = rgb.max(axis=1), rgb.min(axis=1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


def _circular_mean_deg(h: np.ndarray) -> float:
    a = np.deg2rad(h)
    return float(np.rad2deg(np.arctan2(np.sin(a).mean(), np.cos(a).mean())) % 360.0)


def _hue_dist(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b)) % 360.0
    return np.minimum(d, 360.0 - d)


#: reference hue of each colour word: circular mean of its pastel (dataset) and saturated (base) fill
COLOUR_HUES = {
    name: _circular_mean_deg(_hue_deg(np.asarray([PASTEL_COLORS[name], SATURATED_COLORS[name]], np.float32)))
    for name in sorted(PASTEL_COLORS)
}
FILL_MIN_SATURATION = 0.15  # HSV saturation below this is white/grey/black, not a fill
FILL_MARGIN = 1 / 8  # border strip (fraction of the side) left out of the fill region
WHITE_MIN = 200  # a pixel with every channel >= this is white (background of the dataset style)
BACKGROUND_RGB_EXCLUSION = 40.0  # on a coloured background, pixels this close (RGB) to a border colour are background
BACKGROUND_MIN_SHARE = 0.03  # a border colour bin must hold this share of the border's pixels to be background


def _background_colours(arr: np.ndarray, border: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The distinct colours of ``border`` pixels that are common in the border strip, and more so than inside.

    Creatures can reach into the border strip (ears, feet, wings); their colours are more common inside,
    and their anti-aliased edges are rare, so neither is taken for background. Colours are compared in
    bins of 8 levels per channel; a bin must hold ``BACKGROUND_MIN_SHARE`` of the border's pixels.
    """
    q = (arr // 8).astype(np.int64)
    keys = (q[..., 0] * 32 + q[..., 1]) * 32 + q[..., 2]
    share_border = np.bincount(keys[border], minlength=32**3) / border.sum()
    share_inner = np.bincount(keys[inner], minlength=32**3) / inner.sum()
    is_bg = (share_border > share_inner) & (share_border >= BACKGROUND_MIN_SHARE)
    return np.unique(arr[border & is_bg[keys]], axis=0)


def fill_pixels(image) -> np.ndarray:
    """The (N, 3) RGB fill pixels of ``image`` (at 64x64): the creature's coloured pixels.

    A pixel is a fill pixel if it is neither near-black (max channel < ``DARK_THRESHOLD``: outline,
    pupils) nor unsaturated (HSV saturation < ``FILL_MIN_SATURATION``: white background, eye whites,
    greys), and lies inside the central region (a ``FILL_MARGIN`` border strip is left out). If the
    border strip is mostly neither white nor dark, the background is coloured or grey (the base style):
    pixels within ``BACKGROUND_RGB_EXCLUSION`` (RGB euclidean) of a colour of those border pixels count
    as background, not fill. Unlike a hue-based test, this keeps a fill of the background's hue but
    another lightness or saturation (a pink creature on dark magenta).
    """
    arr = _as_array(image)
    n = arr.shape[0]
    mx, mn = arr.max(axis=2), arr.min(axis=2)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    coloured = (mx >= DARK_THRESHOLD) & (sat >= FILL_MIN_SATURATION)
    m = max(1, int(round(n * FILL_MARGIN)))
    inner = np.zeros((n, n), dtype=bool)
    inner[m:n - m, m:n - m] = True
    keep = coloured & inner
    border = ~inner & (mx >= DARK_THRESHOLD) & (mn < WHITE_MIN)  # neither dark nor white: coloured or grey
    if border.sum() > 0.5 * (~inner).sum():
        bg = _background_colours(arr, border, inner)
        cand = arr[keep]
        near_bg = np.zeros(len(cand), dtype=bool)
        for i in range(0, len(bg), 256):  # chunks: at most 256 x 2304 distances at a time
            d2 = ((cand[:, None, :] - bg[None, i:i + 256, :]) ** 2).sum(-1)
            near_bg |= (d2 < BACKGROUND_RGB_EXCLUSION ** 2).any(axis=1)
        keep[keep] = ~near_bg
    return arr[keep]


def nearest_colour_names(rgb: np.ndarray) -> np.ndarray:
    """For each (N, 3) RGB pixel, the colour word (of the six) whose reference hue is nearest."""
    names = sorted(COLOUR_HUES)
    ref = np.asarray([COLOUR_HUES[k] for k in names], np.float32)
    d = _hue_dist(_hue_deg(np.asarray(rgb, np.float32))[:, None], ref[None, :])
    return np.asarray(names)[d.argmin(axis=1)]


def fill_colour_match(image, colour_name: str) -> dict:
    """Whether the creature's fill has the hue of ``colour_name`` (one of the six colour words).

    Returns ``fraction``: the fraction of fill pixels (see ``fill_pixels``) whose nearest colour word
    by hue is ``colour_name`` (0.0 when there are no fill pixels); ``nearest``: the most common
    nearest colour word among the fill pixels (None if none); ``num_fill_pixels``; and ``match``:
    ``nearest == colour_name``. Accent parts (ears, horns, wings) and mixed edge pixels keep
    ``fraction`` below 1 even for a correct image.
    """
    if colour_name not in COLOUR_HUES:
        raise ValueError(f"unknown colour {colour_name!r}; use one of {sorted(COLOUR_HUES)}")
    px = fill_pixels(image)
    if len(px) == 0:
        return {"fraction": 0.0, "nearest": None, "num_fill_pixels": 0, "match": False}
    names = nearest_colour_names(px)
    values, counts = np.unique(names, return_counts=True)
    nearest = str(values[counts.argmax()])
    return {"fraction": float((names == colour_name).mean()), "nearest": nearest,
            "num_fill_pixels": int(len(px)), "match": nearest == colour_name}


def caption_colour(caption: str) -> str | None:
    """The first of the six colour words in ``caption`` (None if there is none)."""
    for word in caption.replace(",", " ").split():
        if word in COLOUR_HUES:
            return word
    return None
