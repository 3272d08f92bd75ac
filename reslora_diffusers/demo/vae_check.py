"""How much of the ``pokemon-style`` look survives a VAE's encode/decode: the best a UNet fine-tune can reach.

A LoRA on the UNet only changes latents; the image is whatever the VAE's decoder makes of them. If the
decoder cannot produce a pastel green with a black outline, no fine-tune can. ``vae_round_trip`` encodes
and decodes dataset images (posterior mean) and scores the result with ``style_score_image`` and, per
colour word, ``fill_colour_match``. The base build gates on it (``scripts/build_tiny_base.py``) and
``python -m benchmarks.quickstart_style RUN --vae_round_trip N`` reports it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..integrations.sd_training import transform_image
from .pokemon_style import OUTLINE, PASTEL_COLORS, SATURATED_COLORS, pokemon_style_sample
from .style_score import caption_colour, fill_colour_match, style_score_image

#: the base build's bars: every colour word keeps its colour in this fraction of round-tripped images ...
GATE_COLOUR_FRACTION = 0.8
#: ... and the round trip's mean style score is at least this (dataset images themselves: 0.95 on average)
GATE_STYLE_MEAN = 0.85
#: how each style's fills are drawn for ``fill_latent_distances``: (colours, background, outline). The dataset's
#: pastels are outlined on white; the base's saturated fills sit on a dark background (its backgrounds vary,
#: but are never close in hue to the fill)
PROBE_STYLES = {"pastel": (PASTEL_COLORS, (255, 255, 255), OUTLINE), "saturated": (SATURATED_COLORS, (30, 30, 40), None)}


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [-1, 1] CHW tensor as an RGB PIL image (clamped, rounded)."""
    array = ((image.clamp(-1, 1).permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(array)


@torch.no_grad()
def vae_round_trip(vae, n: int = 200, resolution: int = 64, seed: int = 0) -> dict:
    """Style score and prompt-colour match of ``n`` dataset images after ``vae``'s encode/decode.

    Images are ``pokemon_style_sample(i, seed, resolution)`` for i < n, converted as training converts
    them (``transform_image``, centre crop, no flip). Returns ``style_min/mean/max`` and
    ``colour_matched``: {colour word: [matched, total]}.
    """
    param = next(vae.parameters())
    per_colour, scores = {}, []
    for i in range(n):
        image, caption = pokemon_style_sample(i, seed, resolution)
        x = transform_image(image, resolution, center_crop=True, random_flip=False, rng=None)[None]
        x = x.to(device=param.device, dtype=param.dtype)
        decoded = to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample[0])
        scores.append(style_score_image(decoded))
        colour = caption_colour(caption)
        matched, total = per_colour.get(colour, (0, 0))
        per_colour[colour] = (matched + int(fill_colour_match(decoded, colour)["match"]), total + 1)
    return {"n": n, "style_min": float(np.min(scores)), "style_mean": float(np.mean(scores)),
            "style_max": float(np.max(scores)), "colour_matched": {k: list(v) for k, v in sorted(per_colour.items())}}


def round_trip_shortfalls(result: dict, min_colour_fraction: float, min_style_mean: float) -> list[str]:
    """What in a ``vae_round_trip`` result is below the bars (an empty list: it passes)."""
    problems = [f"{colour}: {matched}/{total} keep their colour (< {min_colour_fraction:.0%})"
                for colour, (matched, total) in result["colour_matched"].items()
                if matched < min_colour_fraction * total]
    if result["style_mean"] < min_style_mean:
        problems.append(f"style score mean {result['style_mean']:.3f} (< {min_style_mean})")
    return problems


def fill_probe(rgb, background, outline=None, size: int = 64, outline_width: int = 3, box=None):
    """A ``size`` px image of one large ellipse filled with ``rgb`` on ``background`` (outlined in ``outline`` if
    given), and the (size, size) bool mask of its interior: the fill pixels at least ``outline_width`` + 1 px
    inside the ellipse's edge. ``box`` = (x0, y0, x1, y1) places the ellipse (default: centred, size / 16 from
    the edges). Dataset-like: a VAE trained on creatures may not round-trip a whole-frame flat fill (the tiny
    base v4's decodes whole-frame pastel green as blue)."""
    from PIL import ImageDraw

    if box is None:
        box = (size // 16, size // 16, size - 1 - size // 16, size - 1 - size // 16)
    image = Image.new("RGB", (size, size), tuple(background))
    ImageDraw.Draw(image).ellipse(list(box), fill=tuple(rgb), outline=tuple(outline) if outline else None,
                                  width=outline_width if outline else 0)
    (x0, y0, x1, y1), inset = box, outline_width + 1
    rx, ry = (x1 - x0) / 2 - inset, (y1 - y0) / 2 - inset
    yy, xx = np.mgrid[0:size, 0:size]
    return image, ((xx - (x0 + x1) / 2) / rx) ** 2 + ((yy - (y0 + y1) / 2) / ry) ** 2 <= 1.0


def interior_cells(interior: np.ndarray, latent_size: int) -> torch.Tensor:
    """The (latent_size, latent_size) bool mask of the latent cells whose whole pixel block is in ``interior``."""
    factor = interior.shape[-1] // latent_size
    return torch.from_numpy(interior.reshape(latent_size, factor, latent_size, factor).all(axis=(1, 3)))


def fill_latents(latents: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Each fill's latent vector: the (N, C, h, w) ``latents`` averaged over its (N, h, w) interior ``cells``."""
    weights = cells.to(device=latents.device, dtype=latents.dtype).unsqueeze(1)
    return (latents * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3))


@torch.no_grad()
def fill_latent_distances(vae, colours: dict, background=(255, 255, 255), outline=None, size: int = 64) -> dict:
    """How far apart ``vae`` puts fills of ``colours`` ({name: RGB}) in its scaled latent space.

    Each colour is drawn as ``fill_probe`` (a large ellipse on ``background``); its latent vector is the posterior
    mean averaged over the latent cells whose whole pixel block lies inside the fill. Returns ``distances``:
    {(name, name): distance} for each pair, and ``decoded``: {name: the colour word nearest in hue to the decoded
    probe's interior pixels}, which shows whether the probe survives the VAE at all. The UNet denoises in these
    units (noise of standard deviation 1), so fills that are close here are hard to tell apart.
    """
    from .style_score import nearest_colour_names

    param = next(vae.parameters())
    scaling = getattr(getattr(vae, "config", None), "scaling_factor", 1.0)
    latents, decoded = {}, {}
    for name, rgb in colours.items():
        image, interior = fill_probe(rgb, background, outline, size)
        x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        z = vae.encode(x.to(device=param.device, dtype=param.dtype)).latent_dist.mean
        latents[name] = fill_latents(z.float(), interior_cells(interior, z.shape[-1])[None])[0] * scaling
        pixels = to_pil(vae.decode(z).sample[0])
        values, counts = np.unique(nearest_colour_names(np.asarray(pixels)[interior]), return_counts=True)
        decoded[name] = str(values[counts.argmax()])
    names = sorted(colours)
    return {"distances": {(a, b): float((latents[a] - latents[b]).norm()) for i, a in enumerate(names)
                          for b in names[i + 1:]},
            "decoded": decoded}
