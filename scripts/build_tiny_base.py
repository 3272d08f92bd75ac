#!/usr/bin/env python
"""Pretrain the embedded offline tiny SD2-layout base on the CPU (deterministic for a given --threads).

    python scripts/build_tiny_base.py --out reslora_diffusers/demo/assets/tiny-sd2-base --seed 0 \
        --grid docs/tiny_base_samples.png --colour-grid docs/tiny_base_colours.png

1. renders the base domain with PIL: the pokemon-style dataset's creatures (same anatomy, same
   caption grammar, "a green cartoon creature with big eyes and a long tail") in the base style
   (``reslora_diffusers.demo.pokemon_style.base_style_sample``: flat saturated fills, no outlines,
   coloured/patterned backgrounds), plus, for the VAE only, generic clutter and outlined pastel
   creatures on white (``--num-outlined``: drawn like the pokemon-style dataset, from their own rng
   names). SD's VAE reconstructs cartoons it was never fine-tuned on; a VAE that never saw thick
   outlines cannot decode them (tried: the base VAE trained on shapes + clutter reconstructs
   pokemon-style images with L1 0.27 of [-1, 1], as blurry blobs). The UNet never sees them;
2. trains the AutoencoderKL (MSE reconstruction + small KL + an MSE on the colour differences, so that
   pastel fills keep their hue) in two stages, outlines first, then colours (see ``train_vae``). The
   colour stage also keeps the six colour words' fills apart in latent space (``latent_separation_loss``):
   the v4 VAE put pastel orange and yellow 0.12 apart in units of the UNet's noise, and fine-tunes on it
   turned pink creatures orange. Then it gates the build on the VAE: 200 pokemon-style dataset images must
   keep their look through its encode/decode (``reslora_diffusers.demo.vae_check``), or the build stops
   before the UNet, since no fine-tune of the base could reach a look its decoder cannot draw. Sets the
   scaling_factor from the latent statistics;
3. trains the UNet with v-prediction on cached latents, conditioned by the frozen, seeded CLIP text
   encoder (10% caption dropout for classifier-free guidance), with an EMA of its weights;
4. saves the pipeline with ``save_pretrained``: UNet and VAE in fp16, the text encoder in fp32
   (transformers keeps a stored dtype while diffusers loads the UNet/VAE in fp32, so an fp16 text
   encoder breaks ``StableDiffusionPipeline.from_pretrained(DIR)`` with no ``torch_dtype``), and
   optionally writes labelled sample grids.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Passive OpenMP waiting: busy-waiting threads collapse throughput when the 2 cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reslora_diffusers.demo.grids import make_grid
from reslora_diffusers.demo.pokemon_style import (
    COLOR_NAMES,
    DEFAULT_SAMPLE_PROMPTS,
    base_style_sample,
    render_creature,
)
from reslora_diffusers.demo.style_score import caption_colour, fill_colour_match, style_score_image
from reslora_diffusers.demo.tiny_sd2 import (
    TINY_RESOLUTION,
    build_tiny_pipeline,
    build_tiny_scheduler,
    write_tiny_tokenizer_files,
)
from reslora_diffusers.demo.vae_check import (
    GATE_COLOUR_FRACTION,
    GATE_STYLE_MEAN,
    PROBE_STYLES,
    fill_latent_distances,
    fill_latents,
    fill_probe,
    interior_cells,
    round_trip_shortfalls,
    vae_round_trip,
)

# prompts x seeds grid: the training script's sample prompts first, then more of the caption grammar
GRID_CAPTIONS = [
    *DEFAULT_SAMPLE_PROMPTS,
    "a yellow round cartoon creature with small eyes",
    "an orange cartoon creature with big eyes, pointy ears and little feet",
    "a purple cartoon creature with big eyes, a horn and a light belly",
]
# colours grid: rows are these anatomies, columns the six colour words
COLOUR_GRID_ANATOMIES = [
    "cartoon creature with big eyes and a long tail",
    "round cartoon creature with small eyes",
    "cartoon creature with big eyes and wings",
]


def render_clutter(rng: random.Random, resolution: int = TINY_RESOLUTION):
    """Generic random content (VAE training only): shapes, outlines, strokes and dots in any colour."""
    from PIL import Image, ImageDraw

    ss = 4
    size = resolution * ss

    def color():
        kind = rng.random()
        if kind < 0.15:
            return (rng.randint(0, 40),) * 3
        if kind < 0.3:
            return (rng.randint(225, 255),) * 3
        if kind < 0.55:  # pastel
            return tuple(rng.randint(170, 255) for _ in range(3))
        return tuple(rng.randint(0, 255) for _ in range(3))

    img = Image.new("RGB", (size, size), color())
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 5)):
        kind = rng.random()
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        r = rng.uniform(0.05, 0.3) * size
        outline = (rng.randint(0, 30),) * 3 if rng.random() < 0.5 else None
        width = rng.randint(1, 4) * ss if outline else 0
        if kind < 0.4:
            rx, ry = r, r * rng.uniform(0.5, 1.5)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=color(), outline=outline, width=width)
        elif kind < 0.75:
            n = rng.randint(3, 7)
            pts = [(x + r * math.cos(2 * math.pi * k / n + rng.uniform(-0.3, 0.3)),
                    y + r * math.sin(2 * math.pi * k / n + rng.uniform(-0.3, 0.3))) for k in range(n)]
            draw.polygon(pts, fill=color(), outline=outline, width=max(width, 1))
        else:
            pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(rng.randint(2, 4))]
            draw.line(pts, fill=color(), width=rng.randint(1, 5) * ss, joint="curve")
    return img.resize((resolution, resolution), Image.LANCZOS)


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW


def as_input(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def sample_grid(pipe, captions=GRID_CAPTIONS, seeds=(0, 1, 2, 3, 4), steps: int = 20, guidance: float = 3.0):
    rows, matches, styles = [], [], []
    for cap in captions:
        row = []
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            row.append(pipe(cap, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                            height=TINY_RESOLUTION, width=TINY_RESOLUTION).images[0])
            matches.append(fill_colour_match(row[-1], caption_colour(cap))["match"])
            styles.append(style_score_image(row[-1]))
        rows.append(row)
    print(f"grid samples: {sum(matches)}/{len(matches)} keep the prompt's colour; style score "
          f"{min(styles):.3f}-{max(styles):.3f} (mean {np.mean(styles):.3f})", flush=True)
    return make_grid(rows, captions, [f"seed {s}" for s in seeds])


@torch.no_grad()
def colour_grid(pipe, seed: int = 0, steps: int = 20, guidance: float = 3.0):
    """One sample per (anatomy, colour) caption at a fixed seed: rows anatomies, columns the six colours."""
    rows = []
    for anatomy in COLOUR_GRID_ANATOMIES:
        row = []
        for colour in COLOR_NAMES:
            article = "an" if colour[0] in "aeiou" else "a"
            g = torch.Generator().manual_seed(seed)
            row.append(pipe(f"{article} {colour} {anatomy}", num_inference_steps=steps, guidance_scale=guidance,
                            generator=g, height=TINY_RESOLUTION, width=TINY_RESOLUTION).images[0])
        rows.append(row)
    return make_grid(rows, COLOUR_GRID_ANATOMIES, list(COLOR_NAMES))


def write_grids(pipe, args):
    for path, draw in ((args.grid, lambda: sample_grid(pipe, guidance=args.guidance)),
                       (args.colour_grid, lambda: colour_grid(pipe, guidance=args.guidance))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            draw().save(path)
            print(f"wrote {path}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=6000, help="base-style creature training images")
    ap.add_argument("--num-clutter", type=int, default=1500, help="extra generic images for the VAE")
    ap.add_argument("--num-outlined", type=int, default=6000,
                    help="extra outlined pastel creatures on white for the VAE (not the UNet)")
    ap.add_argument("--vae-steps", type=int, default=1600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--colour-weight", type=float, default=0.5,
                    help="weight of the extra MSE on the colour-difference channels R-G and (R+G)/2-B")
    ap.add_argument("--colour-stage-steps", type=int, default=500,
                    help="then train the VAE this many steps more on the creatures only (base style and outlined), "
                         "with --colour-stage-weight, so that neighbouring pastels (orange/yellow, pink) separate")
    ap.add_argument("--colour-stage-lr", type=float, default=3e-4)
    ap.add_argument("--colour-stage-weight", type=float, default=2.0)
    ap.add_argument("--separation-weight", type=float, default=0.1,
                    help="colour stage: weight of the term that keeps the fills of the six colour words apart in "
                         "latent space (0: off, as in the v4 base)")
    ap.add_argument("--separation-margin", type=float, default=1.5,
                    help="the distance (in units of the batch's latent spread) below which two fills are pushed apart")
    ap.add_argument("--probes-per-colour", type=int, default=16, help="fill probes drawn per style and colour word")
    ap.add_argument("--gate-images", type=int, default=200,
                    help="dataset images the trained VAE must round-trip before the UNet is trained (0: no gate)")
    ap.add_argument("--gate-colour", type=float, default=GATE_COLOUR_FRACTION,
                    help="fraction of round-tripped images of every colour word that must keep that colour")
    ap.add_argument("--gate-style", type=float, default=GATE_STYLE_MEAN, help="minimum mean style score of the round trip")
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster when the cores are shared)")
    ap.add_argument("--fp32", action="store_true", help="store the UNet and VAE in fp32 too (the text encoder always is)")
    ap.add_argument("--grid", default=None, help="also write a labelled sample grid PNG here")
    ap.add_argument("--colour-grid", "--shape-grid", dest="colour_grid", default=None,
                    help="also write an anatomies x colours sample grid PNG here")
    ap.add_argument("--grid-only", action="store_true", help="only write the grid(s) from an existing --out")
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance scale for the grid (5 over-saturates stars)")
    args = ap.parse_args(argv)
    if args.grid_only and not (args.grid or args.colour_grid):
        ap.error("--grid-only needs --grid PATH and/or --colour-grid PATH")
    if not 0 <= args.gate_colour <= 1:
        ap.error(f"--gate-colour must be a fraction in [0, 1], got {args.gate_colour}")
    return args


def render_data(args):
    """(base-style images, their captions, clutter, outlined creatures); images as uint8 NCHW tensors."""
    t0 = time.time()
    pairs = [base_style_sample(i, args.seed, TINY_RESOLUTION) for i in range(args.num_images)]
    base_x = to_tensor([p[0] for p in pairs])
    captions = [p[1] for p in pairs]
    crng = random.Random(f"clutter-{args.seed}")
    clutter_x = to_tensor([render_clutter(crng) for _ in range(args.num_clutter)])
    orng = f"vae-outlined-{args.seed}"  # not the dataset's rng names
    outlined_x = to_tensor([render_creature(random.Random(f"{orng}-{i}"), TINY_RESOLUTION)[0]
                            for i in range(args.num_outlined)])
    print(f"rendered {len(base_x)} base + {len(clutter_x)} clutter + {len(outlined_x)} outlined images "
          f"in {time.time() - t0:.1f}s", flush=True)
    return base_x, captions, clutter_x, outlined_x


def colour_differences(x: torch.Tensor) -> torch.Tensor:
    """The colour-difference channels R-G and (R+G)/2-B of an NCHW RGB batch (brightness left out).

    Plain MSE is dominated by the white background and the outlines; pastel fills differ from each other
    by little in RGB, and a VAE trained on MSE alone decodes pastel green, orange and pink as one pale
    yellow (tried: 0/33 green, 0/39 orange, 0/26 pink kept their colour in a 200-image round trip).
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    return torch.stack([r - g, 0.5 * (r + g) - b], 1)


def render_probes(args):
    """Fill probes for the separation term: for each ``PROBE_STYLES`` style and colour word, ``--probes-per-colour``
    ellipses of random size and place (``fill_probe``). Returns {style: (uint8 NCHW images, colour-major,
    latent-cell masks of their interiors)}."""
    rng = random.Random(f"fill-probes-{args.seed}")
    latent_size = TINY_RESOLUTION // 8
    probes = {}
    for style, (colours, background, outline) in PROBE_STYLES.items():
        images, cells = [], []
        for name in COLOR_NAMES:
            for _ in range(args.probes_per_colour):
                cx, cy = rng.randint(26, 38), rng.randint(26, 38)
                rx, ry = rng.randint(18, 24), rng.randint(18, 24)
                image, interior = fill_probe(colours[name], background, outline, TINY_RESOLUTION,
                                             outline_width=rng.randint(2, 4), box=(cx - rx, cy - ry, cx + rx, cy + ry))
                images.append(image)
                cells.append(interior_cells(interior, latent_size))
        probes[style] = (to_tensor(images), torch.stack(cells))
    return probes


def latent_separation_loss(latent_mean: torch.Tensor, cells: torch.Tensor, spread: torch.Tensor, margin: float):
    """Mean over pairs of fills of relu(margin - distance / spread)^2: each fill's latent is the posterior mean
    averaged over its interior ``cells`` (N, h, w), one fill per colour word, in units of ``spread``."""
    fills = fill_latents(latent_mean, cells) / spread
    i, j = torch.triu_indices(len(fills), len(fills), 1)
    return F.relu(margin - (fills[i] - fills[j]).norm(dim=1)).pow(2).mean()


def train_vae_stage(vae, vae_x, steps, lr, colour_weight, args, gen, desc, probes=None):
    """MSE + small KL + ``colour_weight`` x MSE on ``colour_differences``; returns (reconstruction MSE, KL).

    With ``probes`` (``render_probes``), each batch also holds one probe per style and colour word, and
    ``--separation-weight`` x ``latent_separation_loss`` keeps each style's six fills apart in units of the batch's
    latent spread (the scaling factor is set from that spread later, so the separation survives it).
    """
    vae.train().requires_grad_(True)
    # No L1 term: with L1 + MSE (tried, 400 steps) the decoder settles on the median, the background,
    # and reconstructs every shape as a blurry blob in one of two colours.
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    hist = []
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=20)
        idx = torch.randint(len(vae_x), (args.vae_batch,), generator=gen)
        batch = [vae_x[idx]]
        if probes:
            picks = {}
            for style, (images, cells) in probes.items():  # one probe per colour word: colour-major order
                per_colour = len(images) // len(COLOR_NAMES)
                k = torch.randint(per_colour, (len(COLOR_NAMES),), generator=gen) + per_colour * torch.arange(len(COLOR_NAMES))
                picks[style] = cells[k]
                batch.append(images[k])
        x = as_input(torch.cat(batch))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = rec_loss + args.kl_weight * kl
        if colour_weight:
            loss = loss + colour_weight * F.mse_loss(colour_differences(rec), colour_differences(x))
        if probes:
            n = args.vae_batch
            spread = torch.sqrt(post.mean[:n].var() + post.std[:n].pow(2).mean()).detach()
            for style_cells in picks.values():
                loss = loss + args.separation_weight * latent_separation_loss(
                    post.mean[n:n + len(style_cells)], style_cells, spread, args.separation_margin)
                n += len(style_cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
        opt.step()
        hist.append(torch.stack([rec_loss.detach(), kl.detach()]))
        if step % 10 == 0:
            recent = torch.stack(hist[-50:]).mean(0).tolist()
            bar.set_postfix(rec=f"{recent[0]:.4f}", kl=f"{recent[1]:.0f}")
    bar.close()
    vae.eval().requires_grad_(False)
    rec_mse, kl = torch.stack(hist[-50:]).mean(0).tolist()
    return rec_mse, kl


def train_vae(vae, base_x, clutter_x, outlined_x, args, gen):
    """Two stages: all images with ``--colour-weight``, then the creatures only with ``--colour-stage-weight``
    and the fill probes' separation term (``--separation-weight``).

    One stage with a high colour weight from the start (tried: 2.0, 1600 steps) keeps the pastels but
    erases the outlines (round-trip style score 0.35); one stage at 0.5 keeps the outlines but pulls
    neighbouring pastels together (orange 16/39 or yellow 24/31 kept their colour, depending on the run
    length). Outlines first, then colours, keeps both. Returns the last stage's (reconstruction MSE, KL).
    """
    # Start with a small posterior std (logvar bias -6): with a unit std the decoder only sees noise
    # at first and, in a short run, learns nothing but a blurry blob (tried: 150 steps gave that).
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] -= 6.0
    losses = train_vae_stage(vae, torch.cat([base_x, clutter_x, outlined_x]), args.vae_steps, args.vae_lr,
                             args.colour_weight, args, gen, "vae")
    if args.colour_stage_steps:
        probes = render_probes(args) if args.separation_weight else None
        losses = train_vae_stage(vae, torch.cat([base_x, outlined_x]), args.colour_stage_steps, args.colour_stage_lr,
                                 args.colour_stage_weight, args, gen, "vae colours", probes)
    return losses


def report_fill_distances(vae) -> None:
    """Print the scaled latent distances of each style's fills (``fill_latent_distances``, closest pair first)."""
    for style, (colours, background, outline) in PROBE_STYLES.items():
        result = fill_latent_distances(vae, colours, background, outline, TINY_RESOLUTION)
        pairs = sorted(result["distances"].items(), key=lambda item: item[1])
        wrong = {name: got for name, got in result["decoded"].items() if got != name}
        print(f"{style} fills in latent space: " + ", ".join(f"{a}-{b} {d:.2f}" for (a, b), d in pairs)
              + (f"; probes decoded as another colour: {wrong}" if wrong else ""), flush=True)


def check_vae(vae, args) -> dict:
    """Round-trip ``--gate-images`` dataset images; stop the build (before the UNet) if they lose the look."""
    if not args.gate_images:
        return {}
    t0 = time.time()
    result = vae_round_trip(vae, args.gate_images, TINY_RESOLUTION)
    print(f"VAE round trip of {args.gate_images} pokemon-style images ({time.time() - t0:.1f}s): "
          f"style {result['style_mean']:.3f} (min {result['style_min']:.3f}); colour kept "
          + ", ".join(f"{c} {m}/{t}" for c, (m, t) in result["colour_matched"].items()), flush=True)
    problems = round_trip_shortfalls(result, args.gate_colour, args.gate_style)
    if problems:
        raise SystemExit("The trained VAE loses the pokemon-style look, so no fine-tune of this base could reach "
                         "it: " + "; ".join(problems) + ". Train the VAE longer (--vae-steps, --colour-stage-steps), on more "
                         "outlined creatures (--num-outlined) or with other colour weights; --gate-images 0 skips this.")
    return result


def set_scaling_factor(vae, base_x):
    """Scaling factor from the base-style latents' spread; returns (posterior means, posterior stds)."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(base_x), 256):
            post = vae.encode(as_input(base_x[i:i + 256])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    lat_mean, lat_std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / torch.sqrt(lat_mean.var() + (lat_std**2).mean()))
    vae.register_to_config(scaling_factor=scaling)
    return lat_mean, lat_std


def embed_captions(tokenizer, text_encoder, captions):
    """(embedding of each unique caption + the empty one, caption -> row index, the empty caption's row)."""
    uniq = sorted(set(captions)) + [""]
    with torch.no_grad():
        ids = tokenizer(uniq, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        emb = text_encoder(ids)[0]
    return emb, torch.tensor([uniq.index(c) for c in captions]), len(uniq) - 1


def train_unet(unet, lat_mean, lat_std, emb, cap_index, empty_index, args, gen) -> float:
    """v-prediction on cached (scaled) latents with caption dropout; loads the EMA weights; returns the final loss."""
    noise_sched = build_tiny_scheduler("ddpm")
    unet.train()
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    hist = []
    bar = tqdm(range(args.unet_steps), desc="unet", mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=100)
        idx = torch.randint(len(lat_mean), (args.unet_batch,), generator=gen)
        lat = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        noisy = noise_sched.add_noise(lat, noise, t)
        target = noise_sched.get_velocity(lat, noise, t)
        ci = cap_index[idx].clone()
        ci[torch.rand(args.unet_batch, generator=gen) < args.cond_dropout] = empty_index
        loss = F.mse_loss(unet(noisy, t, emb[ci]).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        hist.append(loss.detach())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{torch.stack(hist[-100:]).mean():.4f}")
    bar.close()
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    return float(torch.stack(hist[-100:]).mean())


def save_base(pipe, args) -> float:
    """save_pretrained: UNet/VAE in fp16 (unless --fp32), the text encoder in fp32; returns the size in MB.

    Writes a sibling ``.partial`` folder and renames it into place, so a crash or Ctrl-C while saving
    leaves the previous base (or nothing), never a half-written one.
    """
    out = Path(args.out)
    partial, previous = out.with_name(out.name + ".partial"), out.with_name(out.name + ".previous")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.scheduler = build_tiny_scheduler("ddim")
    save_dtype = torch.float32 if args.fp32 else torch.float16
    pipe.unet.to(save_dtype)
    pipe.vae.to(save_dtype)
    pipe.text_encoder.to(torch.float32)  # fp32: see the module docstring
    pipe.save_pretrained(str(partial), safe_serialization=True)
    write_tiny_tokenizer_files(partial / "tokenizer")  # the human-readable BPE files next to tokenizer.json
    pipe.to(torch.float32)
    if out.exists():
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
    partial.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20


def load_for_grids(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    if args.grid_only:
        write_grids(load_for_grids(args.out), args)
        print(f"grids took {time.time() - t_start:.1f}s")
        return

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    base_x, captions, clutter_x, outlined_x = render_data(args)
    pipe = build_tiny_pipeline(args.seed)

    vae_rec, vae_kl = train_vae(pipe.vae, base_x, clutter_x, outlined_x, args, gen)
    if not args.fp32:  # gate and cache latents with the weights as they will be stored
        pipe.vae.to(torch.float16).to(torch.float32)
    check_vae(pipe.vae, args)

    t0 = time.time()
    lat_mean, lat_std = set_scaling_factor(pipe.vae, base_x)
    emb, cap_index, empty_index = embed_captions(pipe.tokenizer, pipe.text_encoder, captions)
    print(f"cached latents/embeddings in {time.time() - t0:.1f}s; scaling_factor={pipe.vae.config.scaling_factor:.4f}; "
          f"{empty_index} captions", flush=True)
    report_fill_distances(pipe.vae)
    scaling = pipe.vae.config.scaling_factor
    unet_loss = train_unet(pipe.unet, lat_mean * scaling, lat_std * scaling, emb, cap_index, empty_index, args, gen)

    size_mb = save_base(pipe, args)
    total = time.time() - t_start
    print(f"final VAE loss: reconstruction (MSE) {vae_rec:.4f}, KL {vae_kl:.1f}")
    print(f"final UNet loss (v-prediction MSE, mean of last 100 steps): {unet_loss:.4f}")
    print(f"saved {args.out} ({size_mb:.1f} MB) ; total time {total:.1f}s ({total / 60:.1f} min)", flush=True)
    if args.grid or args.colour_grid:
        t0 = time.time()
        write_grids(load_for_grids(args.out), args)
        print(f"grids took {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
