"""``pokemon-style``: a procedural image-caption dataset in a style unlike the tiny base's domain.

Cartoon creatures with thick black outlines and flat pastel fills on a white background, with eyes
and optional ears, horns, wings, tails, feet and belly patches, captioned BLIP-style ("a green
cartoon creature with big eyes and a long tail"). It has the columns of the hub's
lambdalabs pokemon / naruto BLIP-caption datasets (``image``: datasets Image feature, ``text``), so
it goes through the same data path as a real dataset. Deterministic for (num_samples, seed,
resolution); sample ``i`` depends only on (seed, i, resolution), so a smaller dataset is a prefix
of a larger one.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

DATASET_NAME = "pokemon-style"

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


def _lighter(c, amount=0.45):
    return tuple(int(v + (255 - v) * amount) for v in c)


def _darker(c, amount=0.18):
    return tuple(int(v * (1 - amount)) for v in c)


def render_creature(rng: random.Random, resolution: int = 128) -> tuple[Image.Image, str]:
    """Draw one creature; returns (RGB image, caption)."""
    ss = max(1, 256 // resolution)  # draw big, then downsample (anti-aliasing)
    S = resolution * ss
    u = S / 256.0  # drawing unit: coordinates below are for a 256 px canvas
    w = max(1, int(round(rng.uniform(7, 9) * u)))  # thick black outline (~3 px at 64 px)
    img = Image.new("RGB", (S, S), BACKGROUND)
    d = ImageDraw.Draw(img)

    color_name = rng.choice(sorted(PASTEL_COLORS))
    fill = PASTEL_COLORS[color_name]
    accent_name = rng.choice([n for n in sorted(PASTEL_COLORS) if n != color_name])
    accent = PASTEL_COLORS[accent_name]

    cx = 128 * u + rng.uniform(-10, 10) * u
    body_w = rng.uniform(60, 80) * u
    body_h = rng.uniform(50, 72) * u
    body_cy = rng.uniform(150, 168) * u
    has_head = rng.random() < 0.55
    head_r = rng.uniform(40, 52) * u
    head_cy = body_cy - body_h - head_r * 0.55 if has_head else body_cy
    face_cy = head_cy if has_head else body_cy - body_h * 0.25
    top_y = (head_cy - head_r) if has_head else (body_cy - body_h)
    top_r = head_r if has_head else body_w

    features: list[str] = []

    def outlined_ellipse(x0, y0, x1, y1, color):
        d.ellipse([x0, y0, x1, y1], fill=color, outline=OUTLINE, width=w)

    def outlined_polygon(pts, color):
        d.polygon(pts, fill=color, outline=OUTLINE, width=w)

    def outlined_stroke(pts, color, thick):
        d.line(pts, fill=OUTLINE, width=int(thick + 2 * w), joint="curve")
        for x, y in (pts[0], pts[-1]):
            r = thick / 2 + w
            d.ellipse([x - r, y - r, x + r, y + r], fill=OUTLINE)
        d.line(pts, fill=color, width=int(thick), joint="curve")
        x, y = pts[-1]
        r = thick / 2
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)

    # --- behind the body: wings and tail
    if rng.random() < 0.35:
        wing_color = rng.choice([fill, accent, WHITE])
        span = rng.uniform(45, 65) * u
        wy = body_cy - body_h * 0.5
        for side in (-1, 1):
            bx = cx + side * body_w * 0.6
            pts = [(bx, wy), (bx + side * span, wy - span * 0.9), (bx + side * span * 0.85, wy + span * 0.2)]
            outlined_polygon(pts, wing_color)
        features.append("wings")
    tail = rng.choice(["long", "curly", "short", None, None])
    if tail:
        side = rng.choice((-1, 1))
        x0, y0 = cx + side * body_w * 0.8, body_cy + body_h * 0.2
        if tail == "long":
            pts = [(x0, y0), (x0 + side * 28 * u, y0 - 10 * u), (x0 + side * 42 * u, y0 - 40 * u), (x0 + side * 45 * u, y0 - 72 * u)]
            features.append("a long tail")
        elif tail == "curly":
            pts = [(x0 + side * (20 * u + 22 * u * math.cos(a)), y0 - 22 * u - 22 * u * math.sin(a))
                   for a in [math.pi + k * 0.45 * side for k in range(12)]]
            pts = [(x0, y0)] + pts
            features.append("a curly tail")
        else:
            pts = [(x0, y0), (x0 + side * 28 * u, y0 - 8 * u)]
            features.append("a short tail")
        outlined_stroke(pts, fill, rng.uniform(12, 18) * u)

    # --- ears / horns (drawn before the head so the head overlaps their base)
    ears = rng.choice(["pointy", "round", "horn", None])
    ex = top_r * 0.6
    ey = top_y + top_r * 0.35
    if ears == "pointy":
        h = rng.uniform(40, 58) * u
        for side in (-1, 1):
            bx = cx + side * ex
            outlined_polygon([(bx - 18 * u, ey), (bx + side * 14 * u, ey - h), (bx + 18 * u, ey)], fill)
        features.append("pointy ears")
    elif ears == "round":
        r = rng.uniform(16, 22) * u
        for side in (-1, 1):
            bx, by = cx + side * ex * 1.05, ey - r * 0.6
            outlined_ellipse(bx - r, by - r, bx + r, by + r, accent)
        features.append("round ears")
    elif ears == "horn":
        h = rng.uniform(30, 45) * u
        outlined_polygon([(cx - 12 * u, top_y + 10 * u), (cx, top_y - h), (cx + 12 * u, top_y + 10 * u)], accent)
        features.append("a horn")

    # --- feet, body, belly, head
    if rng.random() < 0.6:
        fr = rng.uniform(13, 18) * u
        for side in (-1, 1):
            fx, fy = cx + side * body_w * 0.5, body_cy + body_h * 0.9
            outlined_ellipse(fx - fr * 1.3, fy - fr, fx + fr * 1.3, fy + fr, fill)
        features.append("little feet")
    outlined_ellipse(cx - body_w, body_cy - body_h, cx + body_w, body_cy + body_h, fill)
    if rng.random() < 0.5:
        bw, bh = body_w * 0.55, body_h * 0.5
        by = body_cy + body_h * 0.3
        d.ellipse([cx - bw, by - bh, cx + bw, by + bh], fill=_lighter(fill), outline=OUTLINE, width=max(1, w // 2))
        features.append("a light belly")
    if has_head:
        outlined_ellipse(cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r, fill)

    # --- face
    big_eyes = rng.random() < 0.6
    eye_dx = (head_r if has_head else body_w) * rng.uniform(0.32, 0.42)
    eye_y = face_cy - 4 * u
    er = rng.uniform(13, 17) * u
    for side in (-1, 1):
        x = cx + side * eye_dx
        if big_eyes:
            d.ellipse([x - er, eye_y - er * 1.15, x + er, eye_y + er * 1.15], fill=WHITE, outline=OUTLINE, width=w)
            pr = er * 0.55
            d.ellipse([x - pr, eye_y - pr, x + pr, eye_y + pr * 1.3], fill=OUTLINE)
            hr = pr * 0.4
            d.ellipse([x - pr * 0.35 - hr, eye_y - pr * 0.45 - hr, x - pr * 0.35 + hr, eye_y - pr * 0.45 + hr], fill=WHITE)
        else:
            r = 6 * u
            d.ellipse([x - r, eye_y - r * 1.3, x + r, eye_y + r * 1.3], fill=OUTLINE)
    mouth = rng.choice(["smile", "open", "none"])
    my = eye_y + 20 * u
    if mouth == "smile":
        d.arc([cx - 14 * u, my - 10 * u, cx + 14 * u, my + 8 * u], 20, 160, fill=OUTLINE, width=max(1, w // 2 + 1))
    elif mouth == "open":
        d.ellipse([cx - 8 * u, my - 4 * u, cx + 8 * u, my + 10 * u], fill=_darker(PASTEL_COLORS["pink"], 0.1), outline=OUTLINE, width=max(1, w // 2))

    img = img.resize((resolution, resolution), Image.LANCZOS) if ss > 1 else img

    eye_phrase = "big eyes" if big_eyes else "small eyes"
    rng.shuffle(features)
    features = [eye_phrase] + features[:2]
    if mouth == "smile" and len(features) < 3:
        features.append("a smile")
    body = "round cartoon creature" if not has_head and rng.random() < 0.5 else "cartoon creature"
    article = "an" if color_name[0] in "aeiou" else "a"
    if len(features) == 1:
        tail_text = features[0]
    else:
        tail_text = ", ".join(features[:-1]) + " and " + features[-1]
    return img, f"{article} {color_name} {body} with {tail_text}"


def pokemon_style_sample(index: int, seed: int = 0, resolution: int = 128) -> tuple[Image.Image, str]:
    """The ``index``-th (image, caption) for ``seed`` (deterministic)."""
    return render_creature(random.Random(f"{DATASET_NAME}-{seed}-{index}"), resolution)


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
