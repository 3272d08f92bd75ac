"""Shared pieces of the Stable Diffusion benchmarks (convergence.py, merge_fidelity.py).

Everything runs on the embedded tiny SD2-layout base and the procedural ``pokemon-style`` dataset,
offline. The frozen VAE and text encoder are applied once: training images become latent
distributions and captions become text embeddings, so a training step is the UNet alone. The data
order and the noise depend only on (seed, step), so every arm sees the same batches.

- held-out set: 64 images of ``pokemon-style`` with another seed, each with one fixed (noise,
  timestep); timesteps are spread evenly over [0, 1000). The held-out loss is the v-prediction MSE.
- calibration set (for the ``ls`` merge): 4 batches of 4 training images with fixed noise, timesteps
  stratified over [0, 1000), built by the training script's ``calibration_batches``.
- samples: the training script's three default prompts x seeds 0 and 1, 20 DDIM steps, guidance 4,
  through the merged view (what the exported LoRA gives); scored by ``style_score``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from reslora_diffusers import ResLoRAConfig, inject_reslora, merge_error, merge_reslora, merged_view
from reslora_diffusers.demo.pokemon_style import DEFAULT_SAMPLE_PROMPTS, pokemon_style_sample
from reslora_diffusers.demo.style_score import style_scores
from reslora_diffusers.integrations.sd_run import TARGET_MODULES, step_dir_name, unet_forward
from reslora_diffusers.integrations.sd_training import calibration_batches, diffusion_loss

SAMPLE_PROMPTS = DEFAULT_SAMPLE_PROMPTS  # the training script's default sample prompts
SAMPLE_SEEDS = (0, 1)
RESOLUTION = 64
DATA_SEED = 0  # the dataset itself is fixed; the run seed changes init, data order and noise
HELD_OUT_SEED = 10_000


@dataclass(frozen=True)
class Arm:
    key: str
    structure: Optional[str]  # None: plain peft LoRA
    pre_num: int = 1
    decay: Optional[tuple] = None  # ResLoRAConfig.shortcut_decay
    merge_at: Optional[float] = None  # ResLoRAConfig.merge_at (moments of the merged A reset)

    @property
    def label(self) -> str:
        if self.structure is None:
            return "LoRA"
        name = "ResLoRA is" if self.structure == "is" else f"ResLoRA {self.structure} m={self.pre_num}"
        if self.decay:
            name += f", decay {self.decay[0]:g}-{self.decay[1]:g}"
        if self.merge_at:
            name += f", merge at {self.merge_at:g}"
        return name

    @property
    def family(self) -> str:
        """Arms that differ only in their anneal window share a family; the window is tuned like the LR."""
        return f"{self.key.split('-d')[0]}-decay" if self.decay else self.key


ARMS = {a.key: a for a in [
    Arm("lora", None),
    Arm("is", "is", 1),
    Arm("bs1", "bs", 1), Arm("bs4", "bs", 4), Arm("bs-1", "bs", -1),
    Arm("ms1", "ms", 1), Arm("ms4", "ms", 4), Arm("ms-1", "ms", -1),
    Arm("is-d59", "is", 1, decay=(0.5, 0.9)), Arm("is-d38", "is", 1, decay=(0.3, 0.8)),
    Arm("ms-1-d59", "ms", -1, decay=(0.5, 0.9)), Arm("ms-1-d38", "ms", -1, decay=(0.3, 0.8)),
    Arm("is-m6", "is", 1, merge_at=0.6), Arm("ms-1-m6", "ms", -1, merge_at=0.6),
]}


def parse_arms(keys) -> list[Arm]:
    unknown = [k for k in keys if k not in ARMS]
    if unknown:
        raise SystemExit(f"Unknown arm(s) {unknown}; choose from {', '.join(ARMS)}.")
    return [ARMS[k] for k in keys]


class BenchContext:
    """The frozen base, the encoded data and the fixed evaluation inputs (built once per process)."""

    def __init__(self, num_train: int = 833, num_held_out: int = 64, threads: int = 1):
        from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

        from reslora_diffusers.demo.tiny_sd2 import load_tiny_base

        torch.set_num_threads(threads)
        pipe = load_tiny_base(torch.float32)
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.base_unet = pipe.unet.requires_grad_(False).eval()
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.ddim_config = DDIMScheduler.from_config(pipe.scheduler.config).config
        self._pipeline_cls = StableDiffusionPipeline
        self.scaling = self.vae.config.scaling_factor

        train = [pokemon_style_sample(i, DATA_SEED, RESOLUTION) for i in range(num_train)]
        self.lat_mean, self.lat_std = self._encode([im for im, _ in train])
        self.text = self._embed([t for _, t in train])

        held = [pokemon_style_sample(i, HELD_OUT_SEED, RESOLUTION) for i in range(num_held_out)]
        mean, _ = self._encode([im for im, _ in held])
        g = torch.Generator().manual_seed(HELD_OUT_SEED)
        latents = mean * self.scaling
        noise = torch.randn(latents.shape, generator=g)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.linspace(0, steps - 1, num_held_out).round().long()[torch.randperm(num_held_out, generator=g)]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        hidden = self._embed([t for _, t in held])
        self.held_out = [(noisy[i:i + 32], timesteps[i:i + 32], hidden[i:i + 32]) for i in range(0, num_held_out, 32)]
        self.held_out_targets = [target[i:i + 32] for i in range(0, num_held_out, 32)]

        # the ls merge's fit set, built by the training script's function: 4 batches of 4 training images
        g = torch.Generator().manual_seed(DATA_SEED + 12345)
        self.calibration = calibration_batches(list(range(16)), lambda idx: self._latents(idx, g), self.noise_scheduler,
                                               4, g)

    def _latents(self, idx, generator):
        """(scaled latents sampled from the posteriors of training images ``idx``, their text embeddings)."""
        idx = torch.as_tensor(idx)
        noise = torch.randn(self.lat_mean[idx].shape, generator=generator)
        return (self.lat_mean[idx] + self.lat_std[idx] * noise) * self.scaling, self.text[idx]

    @torch.no_grad()
    def _encode(self, images):
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]))
        x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
        means, stds = [], []
        for i in range(0, len(x), 64):
            post = self.vae.encode(x[i:i + 64]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def _embed(self, captions):
        out = []
        for i in range(0, len(captions), 64):
            ids = self.tokenizer(captions[i:i + 64], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            out.append(self.text_encoder(ids)[0])
        return torch.cat(out)

    # ------------------------------------------------------------------------------ models
    def fresh_unet(self, arm: Arm, seed: int, rank: int = 4):
        """A copy of the base UNet with LoRA (or ResLoRA) of ``rank``; the init depends only on ``seed``."""
        unet = copy.deepcopy(self.base_unet)
        torch.manual_seed(seed)
        if arm.structure is None:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGET_MODULES)), unet)
        else:
            inject_reslora(unet, ResLoRAConfig(structure=arm.structure, pre_num=arm.pre_num, r=rank, lora_alpha=rank,
                                               target_modules=list(TARGET_MODULES), shortcut_decay=arm.decay,
                                               merge_at=arm.merge_at))
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
        return unet

    def batch(self, seed: int, step: int, batch_size: int):
        """(latents, text embeddings, generator) of ``step`` for ``seed``: epoch-wise permutations, latents sampled
        from the generator, which ``diffusion_loss`` then draws the noise and timesteps from; same for every arm."""
        n = len(self.lat_mean)
        per_epoch = n // batch_size
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = torch.from_numpy(order[k * batch_size:(k + 1) * batch_size])
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        latents, hidden = self._latents(idx, g)
        return latents, hidden, g

    # -------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def held_out_loss(self, unet) -> float:
        was_training = unet.training
        unet.eval()
        total, count = 0.0, 0
        for inputs, target in zip(self.held_out, self.held_out_targets):
            pred = unet_forward(unet, inputs)
            total += float(F.mse_loss(pred, target, reduction="sum"))
            count += target.numel()
        unet.train(was_training)
        return total / count

    def merge(self, unet, arm: Arm, method: str = "ls"):
        """The plain-LoRA factors a run exports (None for the plain LoRA arm)."""
        if arm.structure is None:
            return None
        return merge_reslora(unet, method=method, calibration_batches=self.calibration, forward_fn=unet_forward)

    def merged(self, unet, result):
        return contextlib.nullcontext() if result is None else merged_view(unet, result)

    def merge_error(self, unet, result) -> dict:
        """Relative error of the merged UNet output against the unmerged one, on the held-out inputs."""
        return merge_error(unet, result.factors, self.held_out, unet_forward)

    @torch.no_grad()
    def pipeline(self, unet):
        """A Stable Diffusion pipeline of the base's VAE, text encoder and DDIM scheduler around ``unet``."""
        from diffusers import DDIMScheduler

        pipe = self._pipeline_cls(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
            scheduler=DDIMScheduler.from_config(self.ddim_config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def samples(self, unet, steps: int = 20, guidance: float = 4.0):
        """Images for SAMPLE_PROMPTS x SAMPLE_SEEDS (row-major), from ``unet`` as it is (wrap in ``merged``)."""
        was_training = unet.training
        unet.eval()
        pipe = self.pipeline(unet)
        images = []
        for prompt in SAMPLE_PROMPTS:
            for seed in SAMPLE_SEEDS:
                g = torch.Generator().manual_seed(seed)
                images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                                   height=RESOLUTION, width=RESOLUTION).images[0])
        unet.train(was_training)
        return images


def style_of(images) -> float:
    return float(np.mean(style_scores(images)))


def save_samples(images, folder: Path):
    """Write images in the training script's ``samples/step-N/prompt-PP_seed-S.png`` layout."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for p in range(len(SAMPLE_PROMPTS)):
        for s in SAMPLE_SEEDS:
            images[i].save(folder / f"prompt-{p:02d}_seed-{s}.png")
            i += 1
    import json

    (folder / "prompts.json").write_text(json.dumps({"prompts": SAMPLE_PROMPTS, "seeds": list(SAMPLE_SEEDS)}))


def train_run(ctx: BenchContext, arm: Arm, lr: float, seed: int, steps: int, batch_size: int = 8,
              eval_every: int = 20, sample_every: int = 0, rank: int = 4, run_dir: Optional[Path] = None,
              merge: str = "ls", sample_inference_steps: int = 20, export_curve: bool = False) -> dict:
    """Train one arm; returns its curve (train/held-out loss, style) and final merged numbers.

    The training script's loss (``diffusion_loss``) and defaults: AdamW (weight decay 1e-2), constant LR, gradient
    clipping at 1.0.
    The shipped ``ShortcutSchedule`` sets lambda for progress ``step / steps`` (``shortcut_decay``) before
    each step; a ``merge_at`` arm merges in place at that step and drops the AdamW moments of the merged A's.
    ``sample_every`` > 0 also samples (through the merged view) at step 0 and every ``sample_every`` steps.
    ``export_curve`` also records, at every evaluation, the held-out loss of the plain LoRA exported then.
    """
    from reslora_diffusers import ShortcutSchedule

    unet = ctx.fresh_unet(arm, seed, rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = None if arm.structure is None else ShortcutSchedule(unet, steps, opt, merge, ctx.calibration, unet_forward)
    curve = []
    merges = {}  # step -> merge result: the final step's merge serves its samples and the final numbers
    train_seconds = 0.0

    def set_progress(step):
        if schedule is not None:
            schedule.update(step)

    def merged_at(step):
        if step not in merges:
            merges.clear()
            merges[step] = ctx.merge(unet, arm, merge)
        return merges[step]

    window = torch.zeros(())
    window_count = 0

    def evaluate(step, train_loss):
        set_progress(step)  # the model as it stands after ``step`` updates
        row = {"step": step, "train_loss": train_loss, "held_out_loss": ctx.held_out_loss(unet), "style_score": None}
        if export_curve:
            with ctx.merged(unet, merged_at(step)):
                row["held_out_loss_export"] = ctx.held_out_loss(unet)
        if sample_every and step % sample_every == 0:
            result = merged_at(step)
            with ctx.merged(unet, result):
                images = ctx.samples(unet, steps=sample_inference_steps)
            row["style_score"] = style_of(images)
            if run_dir is not None:
                save_samples(images, run_dir / "samples" / step_dir_name(step))
        curve.append(row)

    unet.train()
    if arm.structure is not None:  # trace the chains (the first forward) outside the timed steps
        with torch.no_grad():
            unet_forward(unet, ctx.calibration[0])
    evaluate(0, None)
    for step in range(steps):
        set_progress(step)
        latents, hidden, generator = ctx.batch(seed, step, batch_size)
        t0 = time.perf_counter()
        loss = diffusion_loss(unet, ctx.noise_scheduler, latents, hidden, generator)  # the training script's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_seconds += time.perf_counter() - t0
        window = window + loss.detach()
        window_count += 1
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            train_loss = float(window) / window_count
            if not math.isfinite(train_loss):
                curve.append({"step": step + 1, "train_loss": train_loss, "held_out_loss": float("nan"), "style_score": None})
                break
            evaluate(step + 1, train_loss)
            window, window_count = torch.zeros(()), 0

    final = {"held_out_loss": curve[-1]["held_out_loss"], "train_seconds_per_step": train_seconds / max(1, steps)}
    if math.isfinite(final["held_out_loss"]):
        result = merged_at(curve[-1]["step"])
        with ctx.merged(unet, result):
            final["held_out_loss_merged"] = ctx.held_out_loss(unet)
        final["merge_relative_error"] = ctx.merge_error(unet, result)["relative_output_error"] if result else 0.0
        if schedule is not None:
            final["shortcut_scale"] = schedule.controller.shortcut_scale
        if arm.structure is not None and run_dir is not None:
            from reslora_diffusers.core.export import save_training_state

            save_training_state(unet, str(run_dir), extra={"arm": arm.key, "lr": lr, "seed": seed, "steps": steps})
    return {"arm": arm.key, "lr": lr, "seed": seed, "steps": steps, "curve": curve, "final": final}
