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
from .pokemon_style import pokemon_style_sample
from .style_score import caption_colour, fill_colour_match, style_score_image

#: the base build's bars: every colour word keeps its colour in this fraction of round-tripped images ...
GATE_COLOUR_FRACTION = 0.8
#: ... and the round trip's mean style score is at least this (dataset images themselves: 0.95 on average)
GATE_STYLE_MEAN = 0.85


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


@torch.no_grad()
def fill_latent_distances(vae, colours: dict, size: int = 64) -> dict:
    """How far apart ``vae`` puts flat fills of ``colours`` ({name: RGB}) in its scaled latent space: for each pair of
    names, the distance between their latent vectors (posterior mean, averaged over the latent's interior). The UNet
    denoises in these units (noise of standard deviation 1), so fills that are close here are hard to tell apart."""
    param = next(vae.parameters())
    scaling = getattr(getattr(vae, "config", None), "scaling_factor", 1.0)
    latents = {}
    for name, rgb in colours.items():
        x = torch.tensor(rgb, dtype=torch.float32).div(127.5).sub(1.0).view(1, 3, 1, 1).expand(1, 3, size, size)
        z = vae.encode(x.to(device=param.device, dtype=param.dtype)).latent_dist.mean[0].float()
        border = max(1, z.shape[-1] // 8)  # away from the padded edge
        latents[name] = z[:, border:-border, border:-border].mean(dim=(1, 2)) * scaling
    names = sorted(colours)
    return {(a, b): float((latents[a] - latents[b]).norm()) for i, a in enumerate(names) for b in names[i + 1:]}
