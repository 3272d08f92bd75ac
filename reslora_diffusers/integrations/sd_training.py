"""The Stable Diffusion training pieces that the training script and the SD benchmarks share.

- data: decoding (16-bit aware), PIL + numpy transforms, a dataset whose randomness depends only on
  (seed, epoch, index), an epoch-seeded sampler, a collate that counts unreadable images;
- noise: ``step_generator`` (a micro-batch's noise depends only on seed, step and its place in the global batch);
- the loss: ``encode_batch`` (frozen VAE and text encoder) then ``diffusion_loss`` (noise, timesteps, target,
  UNet, MSE with optional min-SNR weighting);
- the fixed calibration inputs of the ``ls`` merge and of the merge error: ``calibration_batches``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

# --image_interpolation_mode: torchvision's InterpolationMode names (as upstream) -> PIL resampling filters
INTERPOLATION_MODES = {"nearest": "NEAREST", "nearest_exact": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
                       "box": "BOX", "hamming": "HAMMING", "lanczos": "LANCZOS"}


class TrainingError(RuntimeError):
    """A problem with the inputs, reported before any training (or a stop with a clear reason)."""


# ------------------------------------------------------------------------------------- dataset checks
def check_metadata(folder):
    """Each line of an imagefolder's metadata.jsonl is a JSON object with a file_name."""
    path = os.path.join(folder, "metadata.jsonl")
    if not os.path.exists(path):
        raise TrainingError(f"{folder} has no metadata.jsonl: an imagefolder needs one with file_name and captions.")
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise TrainingError(f"{path} line {number} is not valid JSON ({err}). Each line must be one JSON object "
                                    "with file_name and a caption.") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise TrainingError(f"{path} line {number} is not a JSON object with a \"file_name\" key.")


def check_columns(dataset, image_column, caption_column):
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise TrainingError(
                f"{flag} {column!r} is not a column of the dataset. Its columns are: {', '.join(columns)}. "
                f"Pass {flag} with one of them."
            )
    for row, caption in enumerate(dataset[caption_column]):  # one column: cheap, and before any model is loaded
        if not (isinstance(caption, str) or (isinstance(caption, (list, tuple)) and caption
                                             and all(isinstance(c, str) for c in caption))):
            raise TrainingError(
                f"The caption of row {row} (column {caption_column!r}) is {caption!r}, not text. Give every image a "
                "caption (in an imagefolder: a caption key on each metadata.jsonl line), or pass --caption_column "
                "with a text column."
            )


def undecoded(dataset, column):
    """Decode images ourselves (in ImageCaptionDataset) so an unreadable one is counted, not a crash."""
    import datasets

    if isinstance(dataset.features.get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def validate_images(dataset, column):
    """Decode every image once; fail listing the unreadable ones (--on_bad_image error)."""
    from tqdm.auto import tqdm

    bad = []
    for i in tqdm(range(len(dataset)), desc="checking images"):
        try:
            open_image(dataset[i][column])
        except Exception as err:
            bad.append(f"#{i} ({type(err).__name__}: {str(err)[:80]})")
    if bad:
        raise TrainingError(
            f"{len(bad)} unreadable image(s) in column {column!r}: {'; '.join(bad[:10])}. "
            "Fix or remove them, or pass --on_bad_image skip to train without them."
        )


# ------------------------------------------------------------------------------------ images
def to_8bit(image):
    """Scale 16-bit (and 32-bit integer) images to 8 bits: PIL's convert() would clip them to white."""
    from PIL import Image

    if image.mode == "F":
        raise ValueError("floating-point images (PIL mode F) are not supported; save the images with 8 or 16 bits")
    if not image.mode.startswith("I"):
        return image
    array = np.asarray(image).astype(np.int64)
    if array.min() < 0 or array.max() > 65535:
        raise ValueError(f"{image.mode} image with values outside 0..65535 is not supported; save it with 8 or 16 bits")
    return Image.fromarray(np.round(array / 257).astype(np.uint8), "L")


def open_image(value):
    """A decoded RGB PIL image from a datasets Image value (decoded or not); raises on unreadable data."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image.load()
    return to_8bit(image).convert("RGB")


def transform_image(image, resolution, center_crop, random_flip, rng, interpolation="bilinear"):
    """Resize (shorter side), crop, maybe flip, to a [-1, 1] CHW tensor. PIL + numpy only."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    resample = getattr(Image.Resampling, INTERPOLATION_MODES[interpolation])
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), resample)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes, augments and tokenises one example; randomness depends only on (seed, epoch, index).

    ``args`` needs seed, resolution, center_crop, random_flip, image_interpolation_mode, image_column,
    caption_column and proportion_empty_prompts (the training script's flags). An unreadable image is replaced by
    the next readable example, marked ``"bad_index": i``: every batch stays full, so the step count is the one
    planned and, with several processes, every process steps together.
    """

    def __init__(self, hf_dataset, args, tokenizer):
        self.data = hf_dataset
        self.args = args
        self.tokenizer = tokenizer
        self.epoch = 0

    def __len__(self):
        return len(self.data)

    def use_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        index = int(index)
        for offset in range(len(self.data)):
            example = self.example((index + offset) % len(self.data))
            if example is not None:
                if offset:
                    example["bad_index"] = index
                return example
        raise TrainingError("No image of the dataset could be read. Check --image_column and the image files.")

    def example(self, index):
        """The decoded, augmented and tokenised example ``index``, or None if its image cannot be read."""
        row = self.data[index]
        rng = np.random.default_rng([self.args.seed, self.epoch, index])
        try:
            image = open_image(row[self.args.image_column])
        except Exception:
            return None
        caption = row[self.args.caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)):
            caption = caption[int(rng.integers(0, len(caption)))]
        if not isinstance(caption, str):
            raise TrainingError(f"Caption of example {index} is a {type(caption).__name__}, not text.")
        if self.args.proportion_empty_prompts > 0 and rng.random() < self.args.proportion_empty_prompts:
            caption = ""  # trains the unconditional prediction that classifier-free guidance uses
        ids = self.tokenizer(
            caption, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        pixels = transform_image(image, self.args.resolution, self.args.center_crop, self.args.random_flip, rng,
                                 self.args.image_interpolation_mode)
        return {"pixel_values": pixels, "input_ids": ids}


def collate(examples):
    """Stack the examples; ``bad_indices`` lists the unreadable images that another example stood in for."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
            "bad_indices": [e["bad_index"] for e in examples if "bad_index" in e]}  # a list: stays on the host


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, length, seed):
        self.length, self.seed, self.epoch = length, seed, 0

    def use_epoch(self, epoch):  # not set_epoch: accelerate would call that with its own counter
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


# ------------------------------------------------------------------------------------- loss
def step_generator(seed, step, index, device="cpu"):
    """The generator of one micro-batch: it depends only on (seed, optimizer step, index in the global batch).

    So a resumed run draws the same noise, and N processes draw what one process with N-fold gradient
    accumulation draws for the same examples (index = micro * num_processes + process_index).
    """
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4096 + index)
    return g


@torch.no_grad()
def encode_images(vae, pixels, generator):
    """Scaled latents sampled from the VAE posterior (the first draw from ``generator``)."""
    return vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor


def encode_batch(vae, text_encoder, batch, weight_dtype, generator, train_text_encoder=False):
    """(latents, text embeddings) of a collated batch: the frozen VAE, and the text encoder (with grad if trained)."""
    latents = encode_images(vae, batch["pixel_values"].to(weight_dtype), generator)
    with torch.set_grad_enabled(train_text_encoder):
        hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
    return latents, hidden


def diffusion_loss(unet, noise_scheduler, latents, hidden, generator, snr_gamma=None, noise_offset=0.0):
    """The denoising loss of one batch: noise, timesteps and target from ``generator``, then MSE (min-SNR weighted
    with ``snr_gamma``). The target follows the scheduler's prediction type (epsilon or v_prediction)."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                                            device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise TrainingError(f"Unknown prediction type {prediction_type}")
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]) * weights
    return loss.mean()


# ------------------------------------------------------------------------------ calibration
@torch.no_grad()
def calibration_batches(examples: list, encode: Callable, noise_scheduler, num_batches: int, generator,
                        device: Optional[torch.device] = None) -> list[tuple]:
    """``num_batches`` fixed UNet inputs (noisy latents, timesteps, text embeddings) from ``examples``.

    Batch b holds examples b, b + n, ...; the timesteps are stratified over [0, num_train_timesteps) across all
    examples and interleaved, so that every batch spans the whole range. ``encode(group)`` returns (scaled
    latents, text embeddings) of a list of examples, drawing the VAE sample from ``generator`` first; the noise
    is drawn from ``generator`` next. The tensors are returned in fp32 on the CPU.
    """
    steps = noise_scheduler.config.num_train_timesteps
    count = len(examples)
    batches = []
    for b in range(num_batches):
        group = examples[b::num_batches]
        if not group:
            continue
        latents, hidden = encode(group)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        strata = torch.arange(b, count, num_batches, dtype=torch.float64)  # this batch's inputs in the set
        timesteps = ((strata + 0.5) * steps / count).long().clamp_(0, steps - 1).to(device or latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        batches.append((noisy.float().cpu(), timesteps.cpu(), hidden.float().cpu()))
    return batches
