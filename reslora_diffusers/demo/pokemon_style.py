"""``pokemon-style``: a procedural image-caption dataset, and the tiny base's creature domain.

Both draw the same cartoon creatures from the same sampled anatomy (``sample_anatomy``): a body,
an optional head, eyes and optional ears, horns, wings, tails, feet and belly patches, captioned
BLIP-style ("a green cartoon creature with big eyes and a long tail"). Only the drawing style differs:

* the dataset style (``render_creature`` / ``pokemon_style_sample``): thick black outlines and flat
  pastel fills on a white background. It has the columns of the hub's lambdalabs pokemon / naruto
  BLIP-caption datasets (``image``: datasets Image feature, ``text``), so it goes through the same
  data path as a real dataset;
* the base style (``render_base_creature`` / ``base_style_sample``), which the embedded tiny base is
  pretrained on: flat saturated fills, no outlines, dark (not black) pupils, on a saturated or dark
  background that is plain, a gradient, stripes or dots, never white or pastel, and never close in
  hue to the creature's fill.

The six colour words (pink, orange, yellow, green, blue, purple) name a pastel fill in the dataset
style and a saturated fill of about the same hue in the base style, so a prompt's colour survives
the fine-tune. Everything is deterministic: sample ``i`` depends only on (seed, i, resolution) and
the style (the two styles use different rng names), so a smaller dataset is a prefix of a larger one.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

DATASET_NAME = "pokemon-style"
#: the prompts the training script samples by default (and the SD benchmarks score): the caption grammar
DEFAULT_SAMPLE_PROMPTS = [
    "a green cartoon creature with big eyes and a long tail",
    "a pink cartoon creature with big eyes and round ears",
    "a blue cartoon creature with wings",
]

# flat pastel fills, named with the base domain's colour words
PASTEL_COLORS = {
    "pink": (255, 182, 213),
    "orange": (255, 200, 150),
    "yellow": (255, 236, 140),
    "green": (170, 230, 170),
    "blue": (160, 205, 255),
    "purple": (205, 180, 250),
}
OUTLINE = (20, 20, 20)
BACKGROUND = (255, 255, 255)
WHITE = (255, 255, 255)
#: every colour a pokemon-style image is drawn with (the outline/pupils are OUTLINE)
PALETTE = [BACKGROUND, OUTLINE] + list(PASTEL_COLORS.values())


# saturated fills of the base style, one per colour word, each about the hue of its pastel twin
SATURATED_COLORS = {
    "pink": (232, 44, 140),
    "orange": (245, 125, 15),
    "yellow": (240, 200, 10),
    "green": (35, 170, 65),
    "blue": (35, 95, 230),
    "purple": (135, 45, 205),
}
COLOR_NAMES = tuple(sorted(PASTEL_COLORS))
#: base-style name prefix of the per-sample rngs (the dataset uses ``DATASET_NAME``)
BASE_STYLE_NAME = "creature-base"
# base style: pupils, smile and open mouth are dark but never near-black (max channel >= 100)
BASE_PUPIL = (45, 35, 110)
BASE_MOUTH = (160, 30, 70)


def _lighter(c, amount=0.45):
    return tuple(int(v + (255 - v) * amount) for v in c)


def _darker(c, amount=0.18):
    return tuple(int(v * (1 - amount)) for v in c)


def with_article(word: str) -> str:
    """``word`` after the captions' indefinite article: "a green", "an orange"."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def sample_anatomy(rng: random.Random) -> dict:
    """Sample one creature's anatomy and caption (shared by both styles).

    Values are the raw draws, in units of a 256 px canvas; the renderers scale them. The order of
    the draws is that of the original pokemon-style renderer, so its images did not change.
    """
    a: dict = {"outline_w": rng.uniform(7, 9)}
    a["color"] = rng.choice(sorted(PASTEL_COLORS))
    a["accent"] = rng.choice([n for n in sorted(PASTEL_COLORS) if n != a["color"]])
    a["cx"] = rng.uniform(-10, 10)
    a["body_w"] = rng.uniform(60, 80)
    a["body_h"] = rng.uniform(50, 72)
    a["body_cy"] = rng.uniform(150, 168)
    a["has_head"] = rng.random() < 0.55
    a["head_r"] = rng.uniform(40, 52)
    features: list[str] = []
    a["wings"] = None
    if rng.random() < 0.35:
        a["wings"] = (rng.choice(["fill", "accent", "white"]), rng.uniform(45, 65))
        features.append("wings")
    tail = rng.choice(["long", "curly", "short", None, None])
    a["tail"] = None
    if tail:
        side = rng.choice((-1, 1))
        a["tail"] = (tail, side, rng.uniform(12, 18))
        features.append(f"a {tail} tail")
    ears = rng.choice(["pointy", "round", "horn", None])
    a["ears"] = (ears, rng.uniform(*{"pointy": (40, 58), "round": (16, 22), "horn": (30, 45)}[ears])) if ears else None
    if ears:
        features.append({"pointy": "pointy ears", "round": "round ears", "horn": "a horn"}[ears])
    a["feet"] = rng.uniform(13, 18) if rng.random() < 0.6 else None
    if a["feet"] is not None:
        features.append("little feet")
    a["belly"] = rng.random() < 0.5
    if a["belly"]:
        features.append("a light belly")
    a["big_eyes"] = rng.random() < 0.6
    a["eye_dx"] = rng.uniform(0.32, 0.42)
    a["eye_r"] = rng.uniform(13, 17)
    a["mouth"] = rng.choice(["smile", "open", "none"])

    eye_phrase = "big eyes" if a["big_eyes"] else "small eyes"
    rng.shuffle(features)
    features = [eye_phrase] + features[:2]
    if a["mouth"] == "smile" and len(features) < 3:
        features.append("a smile")
    body = "round cartoon creature" if not a["has_head"] and rng.random() < 0.5 else "cartoon creature"
    if len(features) == 1:
        tail_text = features[0]
    else:
        tail_text = ", ".join(features[:-1]) + " and " + features[-1]
    a["caption"] = f"{with_article(a['color'])} {body} with {tail_text}"
    return a


def _draw_creature(img: Image.Image, a: dict, style: str, u: float) -> None:
    """Draw the anatomy ``a`` onto ``img`` (a canvas of 256 * u px) in ``style`` ("pokemon" or "base")."""
    pokemon = style == "pokemon"
    colors = PASTEL_COLORS if pokemon else SATURATED_COLORS
    outline = OUTLINE if pokemon else None
    w = max(1, int(round(a["outline_w"] * u))) if pokemon else 0  # thick black outline (~3 px at 64 px)
    d = ImageDraw.Draw(img)
    fill = colors[a["color"]]
    accent = colors[a["accent"]]

    cx = 128 * u + a["cx"] * u
    body_w = a["body_w"] * u
    body_h = a["body_h"] * u
    body_cy = a["body_cy"] * u
    has_head = a["has_head"]
    head_r = a["head_r"] * u
    head_cy = body_cy - body_h - head_r * 0.55 if has_head else body_cy
    face_cy = head_cy if has_head else body_cy - body_h * 0.25
    top_y = (head_cy - head_r) if has_head else (body_cy - body_h)
    top_r = head_r if has_head else body_w

    def outlined_ellipse(x0, y0, x1, y1, color):
        if pokemon:
            d.ellipse([x0, y0, x1, y1], fill=color, outline=OUTLINE, width=w)
        else:
            d.ellipse([x0, y0, x1, y1], fill=color)

    def outlined_polygon(pts, color):
        if pokemon:
            d.polygon(pts, fill=color, outline=OUTLINE, width=w)
        else:
            d.polygon(pts, fill=color)

    def outlined_stroke(pts, color, thick):
        if pokemon:
            d.line(pts, fill=OUTLINE, width=int(thick + 2 * w), joint="curve")
            for x, y in (pts[0], pts[-1]):
                r = thick / 2 + w
                d.ellipse([x - r, y - r, x + r, y + r], fill=OUTLINE)
        d.line(pts, fill=color, width=int(thick), joint="curve")
        x, y = pts[-1]
        r = thick / 2
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)

    # --- behind the body: wings and tail
    if a["wings"] is not None:
        which, span = a["wings"]
        wing_color = {"fill": fill, "accent": accent, "white": WHITE}[which]
        span = span * u
        wy = body_cy - body_h * 0.5
        for side in (-1, 1):
            bx = cx + side * body_w * 0.6
            pts = [(bx, wy), (bx + side * span, wy - span * 0.9), (bx + side * span * 0.85, wy + span * 0.2)]
            outlined_polygon(pts, wing_color)
    if a["tail"] is not None:
        tail, side, thick = a["tail"]
        x0, y0 = cx + side * body_w * 0.8, body_cy + body_h * 0.2
        if tail == "long":
            pts = [(x0, y0), (x0 + side * 28 * u, y0 - 10 * u), (x0 + side * 42 * u, y0 - 40 * u), (x0 + side * 45 * u, y0 - 72 * u)]
        elif tail == "curly":
            pts = [(x0 + side * (20 * u + 22 * u * math.cos(t)), y0 - 22 * u - 22 * u * math.sin(t))
                   for t in [math.pi + k * 0.45 * side for k in range(12)]]
            pts = [(x0, y0)] + pts
        else:
            pts = [(x0, y0), (x0 + side * 28 * u, y0 - 8 * u)]
        outlined_stroke(pts, fill, thick * u)

    # --- ears / horns (drawn before the head so the head overlaps their base)
    ex = top_r * 0.6
    ey = top_y + top_r * 0.35
    if a["ears"] is not None:
        ears, size = a["ears"]
        if ears == "pointy":
            h = size * u
            for side in (-1, 1):
                bx = cx + side * ex
                outlined_polygon([(bx - 18 * u, ey), (bx + side * 14 * u, ey - h), (bx + 18 * u, ey)], fill)
        elif ears == "round":
            r = size * u
            for side in (-1, 1):
                bx, by = cx + side * ex * 1.05, ey - r * 0.6
                outlined_ellipse(bx - r, by - r, bx + r, by + r, accent)
        else:  # horn
            h = size * u
            outlined_polygon([(cx - 12 * u, top_y + 10 * u), (cx, top_y - h), (cx + 12 * u, top_y + 10 * u)], accent)

    # --- feet, body, belly, head
    if a["feet"] is not None:
        fr = a["feet"] * u
        for side in (-1, 1):
            fx, fy = cx + side * body_w * 0.5, body_cy + body_h * 0.9
            outlined_ellipse(fx - fr * 1.3, fy - fr, fx + fr * 1.3, fy + fr, fill if pokemon else _darker(fill, 0.2))
    outlined_ellipse(cx - body_w, body_cy - body_h, cx + body_w, body_cy + body_h, fill)
    if a["belly"]:
        bw, bh = body_w * 0.55, body_h * 0.5
        by = body_cy + body_h * 0.3
        if pokemon:
            d.ellipse([cx - bw, by - bh, cx + bw, by + bh], fill=_lighter(fill), outline=OUTLINE, width=max(1, w // 2))
        else:
            d.ellipse([cx - bw, by - bh, cx + bw, by + bh], fill=_lighter(fill, 0.3))
    if has_head:
        outlined_ellipse(cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r, fill)

    # --- face
    dark = OUTLINE if pokemon else BASE_PUPIL
    eye_dx = (head_r if has_head else body_w) * a["eye_dx"]
    eye_y = face_cy - 4 * u
    er = a["eye_r"] * u
    for side in (-1, 1):
        x = cx + side * eye_dx
        if a["big_eyes"]:
            d.ellipse([x - er, eye_y - er * 1.15, x + er, eye_y + er * 1.15], fill=WHITE, outline=outline, width=w)
            pr = er * 0.55
            d.ellipse([x - pr, eye_y - pr, x + pr, eye_y + pr * 1.3], fill=dark)
            hr = pr * 0.4
            d.ellipse([x - pr * 0.35 - hr, eye_y - pr * 0.45 - hr, x - pr * 0.35 + hr, eye_y - pr * 0.45 + hr], fill=WHITE)
        else:
            r = 6 * u
            d.ellipse([x - r, eye_y - r * 1.3, x + r, eye_y + r * 1.3], fill=dark)
    my = eye_y + 20 * u
    if a["mouth"] == "smile":
        lw = max(1, int(round(a["outline_w"] * u)) // 2 + 1) if pokemon else max(1, int(round(4 * u)))
        d.arc([cx - 14 * u, my - 10 * u, cx + 14 * u, my + 8 * u], 20, 160, fill=dark, width=lw)
    elif a["mouth"] == "open":
        if pokemon:
            d.ellipse([cx - 8 * u, my - 4 * u, cx + 8 * u, my + 10 * u], fill=_darker(PASTEL_COLORS["pink"], 0.1),
                      outline=OUTLINE, width=max(1, w // 2))
        else:
            d.ellipse([cx - 8 * u, my - 4 * u, cx + 8 * u, my + 10 * u], fill=BASE_MOUTH)


def render_creature(rng: random.Random, resolution: int = 128) -> tuple[Image.Image, str]:
    """Draw one creature in the dataset style (outlined, pastel, white background); returns (RGB image, caption)."""
    a = sample_anatomy(rng)
    ss = max(1, 256 // resolution)  # draw big, then downsample (anti-aliasing)
    S = resolution * ss
    u = S / 256.0  # drawing unit: coordinates are for a 256 px canvas
    img = Image.new("RGB", (S, S), BACKGROUND)
    _draw_creature(img, a, "pokemon", u)
    img = img.resize((resolution, resolution), Image.LANCZOS) if ss > 1 else img
    return img, a["caption"]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v))


def _hue_of(rgb) -> float:
    import colorsys

    return 360.0 * colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0]


def _hue_distance(h1: float, h2: float) -> float:
    d = abs(h1 - h2) % 360.0
    return min(d, 360.0 - d)


def _base_background(rng: random.Random, fill_name: str, size: int) -> Image.Image:
    """A saturated or dark background at least 60 degrees of hue away from the fill: plain, a
    gradient, stripes or dots (pattern colours share the hue within +-20 degrees)."""
    import numpy as np

    fill_hue = _hue_of(SATURATED_COLORS[fill_name])
    hue = rng.uniform(0, 360)
    while _hue_distance(hue, fill_hue) < 80:
        hue = rng.uniform(0, 360)
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.4, 0.8)
    c1 = _hsv_to_rgb(hue, sat, val)
    val2 = val + rng.uniform(0.15, 0.25) if val < 0.6 else val - rng.uniform(0.15, 0.25)  # stays in [0.35, 0.85]
    c2 = _hsv_to_rgb(hue + rng.uniform(-20, 20), min(1.0, sat + rng.uniform(-0.1, 0.1)), val2)
    kind = rng.random()
    if kind < 0.35:
        return Image.new("RGB", (size, size), c1)
    if kind < 0.7:  # gradient (vertical, horizontal or diagonal)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        direction = rng.choice(["v", "h", "d"])
        tt = t[:, None] + 0 * t[None, :] if direction == "v" else (t[None, :] + 0 * t[:, None] if direction == "h"
                                                                    else (t[:, None] + t[None, :]) / 2)
        arr = np.asarray(c1, np.float32) * (1 - tt[..., None]) + np.asarray(c2, np.float32) * tt[..., None]
        return Image.fromarray(arr.round().astype(np.uint8), "RGB")
    img = Image.new("RGB", (size, size), c1)
    d = ImageDraw.Draw(img)
    if kind < 0.85:  # stripes
        period = size * rng.uniform(0.12, 0.22)
        vertical = rng.random() < 0.5
        k = 0.0
        while k < size:
            box = [k, 0, k + period / 2, size] if vertical else [0, k, size, k + period / 2]
            d.rectangle(box, fill=c2)
            k += period
    else:  # dots
        step = size * rng.uniform(0.12, 0.18)
        r = step * rng.uniform(0.18, 0.3)
        off = rng.uniform(0, step)
        y, row = off - step, 0
        while y < size + step:
            x = off - step + (step / 2 if row % 2 else 0)
            while x < size + step:
                d.ellipse([x - r, y - r, x + r, y + r], fill=c2)
                x += step
            y += step
            row += 1
    return img


def render_base_creature(rng: random.Random, resolution: int = 64) -> tuple[Image.Image, str]:
    """Draw one creature in the base style (no outlines, saturated fills, coloured background); returns (image, caption)."""
    a = sample_anatomy(rng)
    ss = max(1, 256 // resolution)
    S = resolution * ss
    u = S / 256.0
    img = _base_background(rng, a["color"], S)
    _draw_creature(img, a, "base", u)
    img = img.resize((resolution, resolution), Image.LANCZOS) if ss > 1 else img
    return img, a["caption"]


def pokemon_style_sample(index: int, seed: int = 0, resolution: int = 128) -> tuple[Image.Image, str]:
    """The ``index``-th (image, caption) of the dataset style for ``seed`` (deterministic)."""
    return render_creature(random.Random(f"{DATASET_NAME}-{seed}-{index}"), resolution)


def base_style_sample(index: int, seed: int = 0, resolution: int = 64) -> tuple[Image.Image, str]:
    """The ``index``-th (image, caption) of the base style for ``seed`` (deterministic; own rng names)."""
    return render_base_creature(random.Random(f"{BASE_STYLE_NAME}-{seed}-{index}"), resolution)


def make_pokemon_style_dataset(num_samples: int = 833, seed: int = 0, resolution: int = 128):
    """A ``datasets.Dataset`` with columns ``image`` (datasets Image feature) and ``text``.

    The default size matches lambdalabs/pokemon-blip-captions (833 rows).
    """
    import datasets

    images, texts = [], []
    for i in range(num_samples):
        im, t = pokemon_style_sample(i, seed, resolution)
        images.append(im)
        texts.append(t)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)


def save_as_imagefolder(dataset, directory: str | os.PathLike, image_column: str = "image",
                        caption_column: str = "text") -> str:
    """Write ``dataset`` as an imagefolder (PNG files + metadata.jsonl with ``file_name`` and ``text``).

    Load it back with ``datasets.load_dataset("imagefolder", data_dir=directory, split="train")``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    digits = max(4, len(str(n - 1)))
    with open(directory / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(dataset):
            name = f"{i:0{digits}d}.png"
            row[image_column].convert("RGB").save(directory / name)
            f.write(json.dumps({"file_name": name, caption_column: row[caption_column]}) + "\n")
    return str(directory)
