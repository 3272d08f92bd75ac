"""Which UNet parameters must a fine-tune change for the quickstart to keep the prompt's colour?

    python -m benchmarks.unet_subsets [--arms lora:1e-3 attention:1e-3 rest:1e-4 all:1e-4] [--seeds 0 1 2]
                                      [--steps 300] [--sweep_seeds 8] [--json out.json]

Every arm fine-tunes the embedded tiny base's UNet on the embedded ``pokemon-style`` dataset (``--num_train``
images, 833 by default; command 1 trains on the first 256) at 64 px, batch 8,
with the training script's ``diffusion_loss``, on the SD benchmarks' cached latents and text embeddings
(``benchmarks._sd_bench.BenchContext``): for a seed, every arm starts from the same base and sees the same batches
and noise. Only which parameters train differs:

- ``lora``: rank-4 plain peft LoRA (alpha = rank) on the attention projections (``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``), as the SD benchmarks' ``lora`` arm: what command 1 trains (``loraN``: rank N);
- ``attention``: the same projections' full weights and biases;
- ``rest``: every UNet parameter except those projections (resnets, norms, ``proj_in``/``proj_out``, feed-forwards,
  time embedding, convolutions);
- ``all``: the whole UNet.

An arm is ``name:learning_rate`` (AdamW, weight decay 0.01, constant rate). After training, the arm's UNet is
sampled as it is (unmerged) with the base's VAE, text encoder and DDIM scheduler, in the colour sweep of
``benchmarks.quickstart_style`` (every colour word at seeds 0..N-1, guidance 4, 20 DDIM steps). The table gives,
per colour word, the samples that keep the prompt's colour. This is not byte for byte a run of the training
script (the images are drawn at 64 px, not resized from 128 px); the ``lora`` arm stands for command 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from benchmarks import _sd_bench as bench
from benchmarks.quickstart_style import sweep_colours
from reslora_diffusers.demo.pokemon_style import COLOR_NAMES
from reslora_diffusers.integrations.sd_run import TARGET_MODULES
from reslora_diffusers.integrations.sd_training import diffusion_loss

ARMS = ("lora", "attention", "rest", "all")
BATCH = 8


def lora_rank(arm: str):
    """The LoRA rank of a ``lora``/``loraN`` arm (4 for ``lora``), None for a full-weight arm."""
    if arm == "lora":
        return 4
    if arm.startswith("lora") and arm[4:].isdigit() and int(arm[4:]) > 0:
        return int(arm[4:])
    return None


def parse_arm(text: str) -> tuple[str, float]:
    name, _, lr = text.partition(":")
    if (name not in ARMS and lora_rank(name) is None) or not lr:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an arm is NAME:LR with NAME one of {', '.join(ARMS)} or loraN (rank N), e.g. lora:1e-3")
    return name, float(lr)


def is_projection(name: str) -> bool:
    """Whether a UNet parameter belongs to an attention projection that command 1 adapts."""
    return any(f".{target}." in f".{name}" for target in TARGET_MODULES)


def trainable_unet(ctx: bench.BenchContext, arm: str, seed: int):
    """A fresh copy of the base UNet with only the arm's parameters trainable; returns (unet, trainable params)."""
    if lora_rank(arm) is not None:
        unet = ctx.fresh_unet(bench.ARMS["lora"], seed, rank=lora_rank(arm))
    else:
        unet = copy.deepcopy(ctx.base_unet)
        for name, p in unet.named_parameters():
            p.requires_grad_(arm == "all" or is_projection(name) == (arm == "attention"))
    return unet, [p for p in unet.parameters() if p.requires_grad]


def fine_tune(ctx: bench.BenchContext, arm: str, lr: float, seed: int, steps: int):
    """Train the arm; returns (unet, number of trained parameters, mean loss of the last 50 steps, seconds)."""
    unet, params = trainable_unet(ctx, arm, seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    losses, start = [], time.perf_counter()
    unet.train()
    for step in range(steps):
        latents, hidden, generator = ctx.batch(seed, step, BATCH)
        loss = diffusion_loss(unet, ctx.noise_scheduler, latents, hidden, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    unet.eval()
    tail = float(torch.stack(losses[-50:]).mean())
    return unet, sum(p.numel() for p in params), tail, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", type=parse_arm,
                    default=[("lora", 1e-3), ("attention", 1e-3), ("rest", 1e-4), ("all", 1e-4)])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sweep_seeds", type=int, default=8)
    ap.add_argument("--num_train", type=int, default=833, help="dataset images (command 1 uses 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    ctx = bench.BenchContext(num_train=args.num_train, num_held_out=32, threads=args.threads)
    n = len(COLOR_NAMES) * args.sweep_seeds
    rows = []
    print("| arm | lr | seed | trained params | loss (last 50) | " + " | ".join(COLOR_NAMES) + " | all | style |")
    print("|---|---|---|---|---|" + "---|" * (len(COLOR_NAMES) + 2))
    for arm, lr in args.arms:
        for seed in args.seeds:
            unet, count, loss, seconds = fine_tune(ctx, arm, lr, seed, args.steps)
            with torch.no_grad():
                sweep = sweep_colours(ctx.pipeline(unet), args.sweep_seeds, bench.RESOLUTION, 4.0)
            kept = sum(v["kept"] for v in sweep.values())
            style = float(np.mean([v["style_mean"] for v in sweep.values()]))
            rows.append(dict(arm=arm, lr=lr, seed=seed, params=count, loss=loss, train_seconds=seconds, sweep=sweep))
            cells = " | ".join(str(sweep[c]["kept"]) for c in COLOR_NAMES)
            print(f"| {arm} | {lr:g} | {seed} | {count:,} | {loss:.3f} | {cells} | {kept}/{n} | {style:.2f} |", flush=True)
    wall = time.perf_counter() - start
    print(f"{len(rows)} fine-tunes of {args.steps} steps in {wall / 60:.1f} min, {args.threads} torch thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, sweep_seeds=args.sweep_seeds, rows=rows, wall_seconds=wall), f, indent=1)


if __name__ == "__main__":
    main()
