#!/usr/bin/env python
"""Fine-tune Stable Diffusion (2) with ResLoRA and export a merged, plain LoRA.

    accelerate launch train_text_to_image_reslora.py --dataset pokemon-blip-captions \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2 --resolution 768

With no model and no dataset it trains the embedded tiny SD2-layout base on the procedural
``pokemon-style`` dataset (offline, a few minutes on a CPU). Flags follow diffusers'
``examples/text_to_image/train_text_to_image_lora.py``; ResLoRA adds ``--reslora_structure``,
``--pre_num``, ``--lora_alpha`` and ``--merge``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from reslora_diffusers import ShortcutSchedule, inject_reslora, load_training_state, merged_view, save_training_state
from reslora_diffusers.core.export import (
    DIFFUSERS_WEIGHT_NAME,
    EXPORT_FORMATS,
    KOHYA_WEIGHT_NAME,
    atomic_save_image,
    atomic_write_text,
)
from reslora_diffusers.core.model import get_controller
from reslora_diffusers.demo.pokemon_style import DEFAULT_SAMPLE_PROMPTS
from reslora_diffusers.integrations.cli import add_reslora_args, reslora_config_from_args
from reslora_diffusers.integrations.distributed import (
    UnsupportedDistributedMode,
    check_training_setup,
    load_state_kwargs,
    process_group_kwargs,
    release_ddp_reducer,
    save_state_kwargs,
)
from reslora_diffusers.integrations.run_dir import (
    RunDirError,
    acquire_lock,
    check_config,
    check_launch,
    check_ownership,
    check_schedule_steps,
    clear_run_outputs,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_run_record,
)
from reslora_diffusers.integrations.sd_run import (
    CALIBRATION_NAME,
    SUGGESTED_SHORTCUT_DECAY,
    TARGET_MODULES,
    TEXT_ENCODER_STATE_DIR,
    TEXT_ENCODER_TARGET_MODULES,
    export_complete,
    export_run,
    merge_pipeline,
    merge_summary,
    remove_export,
    save_calibration,
    split_calibration,
    step_dir_name,
    text_encoder_forward,
    unet_forward,
)
from reslora_diffusers.integrations.sd_training import (
    INTERPOLATION_MODES,
    EpochShuffleSampler,
    ImageCaptionDataset,
    TrainingError,
    calibration_batches,
    check_columns,
    check_metadata,
    collate,
    diffusion_loss,
    encode_batch,
    encode_images,
    step_generator,
    undecoded,
    validate_images,
)

DATASET_ALIASES = {
    "pokemon-blip-captions": "lambdalabs/pokemon-blip-captions",
    "naruto-blip-captions": "lambdalabs/naruto-blip-captions",
}
EMBEDDED_DATASET = "pokemon-style"
EXPORT_SAMPLES_DIR = "export"  # samples/export/: from the exported file, loaded by stock diffusers
# defaults for the embedded tiny base (a short CPU run); hub models get diffusers' defaults
# (rank 64: at rank 4 the tiny base's 32-96-wide projections keep ~10 of 48 colour words fewer, docs/unet_subsets.md)
EMBEDDED_DEFAULTS = dict(resolution=64, train_batch_size=8, max_train_steps=300, learning_rate=1e-3, sample_steps=50,
                         rank=64)
HUB_DEFAULTS = dict(resolution=512, train_batch_size=1, max_train_steps=None, learning_rate=1e-4, sample_steps=500,
                    rank=4)
#: the embedded base's is/ms runs anneal their shortcuts (merge-aware training) unless told otherwise: at rank 64 the
#: ls merge of an undecayed run is 37-41% off the trained model. merge_summary suggests the same window to any run.
EMBEDDED_SHORTCUT_DECAY = SUGGESTED_SHORTCUT_DECAY
#: the end-of-run merge warning's pointer to the samples
SAMPLES_ADVICE = "samples/export shows the export; --sample_view trained draws the trained model in samples/step-N. "
#: what the snapshots draw: the merge an export at that step would give, or the model being trained
SAMPLE_VIEWS = ("merged", "trained")
POSITIVE_INTS = [
    "resolution", "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
    "checkpointing_steps", "checkpoints_total_limit", "sample_steps", "num_validation_images", "sample_num_inference_steps",
    "calibration_batches", "max_train_samples", "pokemon_style_size", "merge_window", "rank", "simulate_interrupt_at_step",
    "validation_epochs",
]
NON_NEGATIVE = ["lr_warmup_steps", "dataloader_num_workers", "max_grad_norm", "noise_offset", "adam_weight_decay", "sample_guidance_scale"]
POSITIVE_FLOATS = ["learning_rate", "adam_epsilon", "snr_gamma"]
#: flags added after runs were recorded, with the value that computes what those runs computed
LATER_FLAGS = {"proportion_empty_prompts": 0.0}
#: flags whose whole effect is another recorded flag (--no_shortcut_decay only decides --shortcut_decay)
RESOLVED_FLAGS = {"no_shortcut_decay"}
#: flags never written anywhere (run record, trackers): the record and the logs may be uploaded or shared
SECRET_FLAGS = {"hub_token"}
# flags that do not change what a run computes: a resume may change them
OPERATIONAL_FLAGS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "simulate_interrupt_at_step", "report_to", "logging_dir",
    "dataloader_num_workers", "cache_dir", "checkpointing_steps", "checkpoints_total_limit", "max_train_steps",
    "num_train_epochs", "reslora_config", "sample_view", "push_to_hub", "hub_model_id", *SECRET_FLAGS,
}


# ----------------------------------------------------------------------------------------- args
def parse_args(input_args=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Diffusers SD pipeline (hub id or folder). Default: the embedded tiny SD2-layout base.")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--dataset", default=None,
                   help=f"{', '.join(DATASET_ALIASES)}, {EMBEDDED_DATASET} (embedded, offline), a hub dataset id, or "
                   "a local imagefolder with metadata.jsonl. Default: pokemon-style.")
    g.add_argument("--dataset_name", default=None, help="Hub dataset id (as in diffusers' example).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl (as in diffusers).")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Fraction of training captions replaced by the empty prompt (0 to 1), as in diffusers' "
                   "SDXL and ControlNet scripts: it trains the unconditional prediction that guidance uses.")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--pokemon_style_size", type=int, default=256, help="Samples of the embedded dataset.")
    g.add_argument("--on_bad_image", choices=["skip", "error"], default="skip",
                   help="skip: drop unreadable images and count them; error: check every image before training.")
    g.add_argument("--cache_dir", default=None)

    # --reslora_structure --pre_num --rank --lora_alpha --merge ... (shared with the examples)
    g = add_reslora_args(p, rank_default=None, rank_help="LoRA rank r. Default: 64 on the embedded tiny base, else 4.")
    g.add_argument("--no_shortcut_decay", action="store_true",
                   help="On the embedded base, keep is/ms shortcuts to the end (its default is --shortcut_decay "
                   f"{EMBEDDED_SHORTCUT_DECAY[0]} {EMBEDDED_SHORTCUT_DECAY[1]} unless --merge_at is given).")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also put ResLoRA on the CLIP text encoder's attention (q/k/v/out_proj), with its own chains; "
                   "exported under text_encoder.")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="reslora-model")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Replace the run already in --output_dir (its checkpoints, samples and export).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=int, default=None)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--image_interpolation_mode", choices=list(INTERPOLATION_MODES), default="bilinear",
                   help="Resize filter (upstream's default is lanczos; bilinear keeps this script's earlier runs).")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--train_batch_size", type=int, default=None)
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true", help="Non-reentrant (exact for every structure).")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None)
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--prediction_type", default=None, choices=[None, "epsilon", "v_prediction"])
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (needs bitsandbytes and CUDA).")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention in the UNet (needs xformers and CUDA).")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    g.add_argument("--simulate_interrupt_at_step", type=int, default=None,
                   help="Testing aid: act as if SIGTERM arrived at this step (checkpoint, then exit).")

    g = p.add_argument_group("samples and logging")
    g.add_argument("--sample_steps", type=int, default=None, help="Sample every N optimizer steps (and at step 0).")
    g.add_argument("--sample_prompts", nargs="+", default=None)
    g.add_argument("--validation_prompt", default=None, help="Added to the sample prompts.")
    g.add_argument("--num_validation_images", type=int, default=1, help="Seeds per prompt in each snapshot.")
    g.add_argument("--sample_num_inference_steps", type=int, default=20)
    g.add_argument("--sample_guidance_scale", type=float, default=4.0)
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Also sample at the end of every N-th epoch (upstream's validation cadence; default: only "
                   "--sample_steps).")
    g.add_argument("--sample_view", choices=SAMPLE_VIEWS, default=None,
                   help="What the snapshots (samples/step-N, the grid's step columns) draw: 'merged', the merge an "
                   "export at that step would give, or 'trained', the model being trained (shortcuts included). "
                   "Default: 'trained' when --shortcut_decay or --merge_at makes the final export the trained model "
                   "(the embedded base's is/ms runs), else 'merged'. The 'export' column is always the export.")
    g.add_argument("--sample_unmerged", action="store_true",
                   help="With --sample_view merged, also save the trained (unmerged) view in samples/step-N/unmerged "
                   "(is/ms). With --sample_view trained the samples already are that view.")
    g.add_argument("--report_to", default=None, help="tensorboard, wandb, all or none. Default: tensorboard if installed.")
    g.add_argument("--logging_dir", default="logs")

    g = p.add_argument_group("export")
    g.add_argument("--export_format", choices=EXPORT_FORMATS, default="both",
                   help=f"diffusers: {DIFFUSERS_WEIGHT_NAME} (load_lora_weights); kohya: {KOHYA_WEIGHT_NAME} "
                   "(ComfyUI, A1111; diffusers loads it too); both.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the export and samples to the hub at the end.")
    g.add_argument("--hub_model_id", default=None, help="Hub repository (default: the output_dir's name).")
    g.add_argument("--hub_token", default=None)
    args = p.parse_args(input_args)
    fill_defaults(args)
    return args


def fill_defaults(args):
    embedded = args.pretrained_model_name_or_path is None
    defaults = EMBEDDED_DEFAULTS if embedded else HUB_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.no_shortcut_decay and args.shortcut_decay is not None:
        raise TrainingError("--no_shortcut_decay and --shortcut_decay contradict each other: give one of them.")
    if embedded and not args.no_shortcut_decay and args.shortcut_decay is None and args.merge_at is None \
            and args.reslora_structure in ("is", "ms"):
        args.shortcut_decay = list(EMBEDDED_SHORTCUT_DECAY)
    if args.sample_view is None:
        args.sample_view = "trained" if args.shortcut_decay or args.merge_at is not None else "merged"
    sources = [f"--{name}" for name in ("dataset", "dataset_name", "train_data_dir") if getattr(args, name)]
    if len(sources) > 1:
        raise TrainingError(f"{' and '.join(sources)} both name the training data; pass only one of them.")
    if not sources:
        args.dataset = EMBEDDED_DATASET
    validate_flags(args)
    if args.dataset is not None and "/" not in args.dataset and args.dataset != EMBEDDED_DATASET \
            and args.dataset not in DATASET_ALIASES and not os.path.isdir(args.dataset):
        raise TrainingError(
            f"Unknown dataset alias {args.dataset!r}. Use one of {', '.join([EMBEDDED_DATASET, *DATASET_ALIASES])}, "
            "a hub dataset id (owner/name) or a local imagefolder with metadata.jsonl."
        )
    try:  # validates structure, pre_num, rank, alpha, dropout, shortcut_decay, merge_at
        args.reslora_config = reslora_config_from_args(args, TARGET_MODULES)
    except ValueError as err:
        raise TrainingError(str(err)) from err


def validate_flags(args):
    """Refuse impossible values up front, naming the flag (before any model or data is loaded)."""
    for name in POSITIVE_INTS + NON_NEGATIVE + POSITIVE_FLOATS:
        value = getattr(args, name)
        if value is None:
            continue
        if name in NON_NEGATIVE and value < 0:
            raise TrainingError(f"--{name} {value} is negative; it must be 0 or more.")
        if name not in NON_NEGATIVE and not value > 0:
            raise TrainingError(f"--{name} {value} must be greater than 0.")
    if args.resolution % 8:
        raise TrainingError(f"--resolution {args.resolution} is not a multiple of 8 (the VAE downsamples by 8); use e.g. "
                            f"{max(8, args.resolution // 8 * 8)}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise TrainingError(f"--{name} {getattr(args, name)} must be in [0, 1).")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise TrainingError(f"--proportion_empty_prompts {args.proportion_empty_prompts} must be in [0, 1].")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise TrainingError("--overwrite_output_dir replaces the run that --resume_from_checkpoint would continue; pass one of them.")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise TrainingError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder. Pass a checkpoint-N "
                            "folder or 'latest'.")
    check_output_dir(args.output_dir)


def check_output_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainingError(f"--output_dir {path} exists and is not a folder.")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"--output_dir {path} cannot be written ({existing} is not a writable folder). "
                            "Choose another --output_dir.")


def run_config(args):
    """What determines a run's result: a resume must match it. A flag added after runs were recorded is left out
    at the default that reproduces those runs (``LATER_FLAGS``), and a flag recorded through another one
    (``RESOLVED_FLAGS``) is left out, so runs recorded before them still resume."""
    return {k: v for k, v in vars(args).items() if k not in OPERATIONAL_FLAGS and k not in RESOLVED_FLAGS
            and not (k in LATER_FLAGS and v == LATER_FLAGS[k])}


def tracker_config(args) -> dict:
    """The flags logged to tensorboard/wandb: the scalar ones, never a secret (``SECRET_FLAGS``)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k not in SECRET_FLAGS}


# ---------------------------------------------------------------------------------------- setup
def resolve_report_to(value):
    import importlib.util

    if value is None:
        return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    for name in (["tensorboard", "wandb"] if value == "all" else [value]):
        if name != "none" and importlib.util.find_spec(name) is None:
            raise TrainingError(f"--report_to {value}: {name} is not installed. pip install {name}, or pass --report_to none.")
    return value


def check_optional_features(args):
    """Flags that need a package, a GPU or the hub fail here, before any model or data is loaded."""
    import importlib.util

    needs = {"--enable_xformers_memory_efficient_attention": (args.enable_xformers_memory_efficient_attention, "xformers"),
             "--use_8bit_adam": (args.use_8bit_adam, "bitsandbytes")}
    for flag, (wanted, package) in needs.items():
        if not wanted:
            continue
        if importlib.util.find_spec(package) is None:
            raise TrainingError(f"{flag} needs {package}, which is not installed: pip install {package}, or drop {flag}.")
        if not torch.cuda.is_available():
            raise TrainingError(f"{flag} needs a CUDA GPU ({package}); none is available. Drop {flag} on this machine.")
    if args.push_to_hub:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise TrainingError("--push_to_hub needs the Hugging Face hub, but HF_HUB_OFFLINE is set. Unset it, or "
                                "drop --push_to_hub and upload the output_dir later (`hf upload`).")


def create_hub_repo(args):
    """Create (or reuse) the hub repository at start-up, so a missing network or login fails before training."""
    from huggingface_hub import create_repo

    repo_id = args.hub_model_id or Path(args.output_dir).name
    try:
        return create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
    except Exception as err:  # no network, no login, no permission
        raise TrainingError(
            f"--push_to_hub: could not create the hub repository {repo_id!r} ({type(err).__name__}: {str(err)[:200]}). "
            "Check the network and `hf auth login` (or --hub_token), or drop --push_to_hub."
        ) from err


def cpu_contention_warning(load: float, cores: int, threads: int) -> Optional[str]:
    """A warning when other work already keeps the cores busy (1-minute ``load``) and torch would add ``threads``
    spin-waiting threads on top; None otherwise."""
    if threads < 2 or load < 0.9 or load + threads <= cores + 0.5:
        return None
    return (f"The CPU looks busy (1-minute load average {load:.1f} on {cores} cores) and torch uses {threads} threads. "
            "If other jobs are running, start this one with OMP_NUM_THREADS=1: torch's threads spin-wait on shared "
            "cores (the quickstart took 20 s per step instead of 0.24 s beside another 2-thread job).")


def warn_if_cpu_is_shared(accelerator):
    if accelerator.device.type == "cpu" and accelerator.is_main_process and hasattr(os, "getloadavg"):
        warning = cpu_contention_warning(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
        if warning:
            accelerator.print(f"Warning: {warning}")


def make_accelerator(args, report_to):
    """The Accelerator, after refusing the distributed modes and flag combinations ResLoRA cannot train."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=process_group_kwargs(),  # gloo for DeepSpeed on a machine without CUDA
    )
    try:
        # FSDP / ZeRO-3 shard what ResLoRA reads across layers; DeepSpeed must agree with the flags
        mode = check_training_setup(accelerator, args.gradient_accumulation_steps, args.max_grad_norm)
    except UnsupportedDistributedMode as err:
        raise TrainingError(str(err)) from err
    if args.merge_at is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError(
            "--merge_at resets the optimizer moments of the merged factors, which DeepSpeed keeps in its own "
            "partitions. Use --shortcut_decay under DeepSpeed, or train with DDP."
        )
    if args.train_text_encoder and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError("--train_text_encoder is not supported with DeepSpeed yet (one model per DeepSpeed engine "
                            "here). Train it in a single process or with DDP, or drop --train_text_encoder.")
    accelerator.print(f"Training mode: {mode}, {accelerator.num_processes} process(es), device {accelerator.device}")
    return accelerator


# --------------------------------------------------------------------------- run folder, checkpoints
def resolve_checkpoint(args):
    """(verified checkpoint folder, its step) to resume from, or (None, 0)."""
    if not args.resume_from_checkpoint:
        return None, 0
    if args.resume_from_checkpoint == "latest":
        path = latest_checkpoint(args.output_dir)
        if path is None:
            return None, 0
    else:
        path = Path(args.resume_from_checkpoint)
    return path, verify_checkpoint(path)["step"]


def launch_settings(accelerator) -> dict:
    """How the run was launched, where it changes what a step computes (numerics, global batch)."""
    return {"mixed_precision": str(accelerator.mixed_precision), "num_processes": accelerator.num_processes}


def resumed_runs(args, resume_path) -> list[str]:
    """The run folders whose record a resume must match (none without a resume): the output dir, and the
    checkpoint's own run folder when the checkpoint lies elsewhere."""
    if resume_path is None:
        return []
    folders = [args.output_dir]
    if resume_path.resolve().parent != Path(args.output_dir).resolve():
        folders.append(str(resume_path.parent))
    return folders


def check_run_folder(args, accelerator):
    """The output dir is ours (or ours to resume): returns (checkpoint to resume from or None, its step)."""
    check_ownership(args.output_dir, run_config(args), bool(args.resume_from_checkpoint), args.overwrite_output_dir,
                    finished=export_complete(args.output_dir), ignored=OPERATIONAL_FLAGS | RESOLVED_FLAGS)
    resume_path, resume_step = resolve_checkpoint(args)
    for folder in resumed_runs(args, resume_path):
        if folder != args.output_dir:  # a checkpoint of another run folder: its run's record
            check_config(folder, run_config(args), OPERATIONAL_FLAGS | RESOLVED_FLAGS,
                         what="--resume_from_checkpoint's run folder")
        check_launch(folder, launch_settings(accelerator))  # (--overwrite_output_dir cannot come with a resume)
    if args.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"No checkpoint to resume from in {args.output_dir}; starting a new run.")
    return resume_path, resume_step


#: learning-rate schedules that do not depend on --max_train_steps
LENGTH_FREE_LR_SCHEDULERS = ("constant", "constant_with_warmup")


def run_length_schedules(args) -> list[str]:
    """The flags whose schedule spans the whole run (fractions of --max_train_steps)."""
    spans = [] if args.lr_scheduler in LENGTH_FREE_LR_SCHEDULERS else [f"--lr_scheduler {args.lr_scheduler}"]
    if args.shortcut_decay:
        spans.append("--shortcut_decay")
    if args.merge_at is not None:
        spans.append("--merge_at")
    return spans


def claim_output_dir(args, resume_path, resume_step, calibration, text_calibration=None, launch=None):
    """The first writes: clear a replaced run (or a stale export), record this run's configuration and trajectory head,
    save the calibration set."""
    if args.overwrite_output_dir:
        clear_run_outputs(args.output_dir)
    elif resume_step < args.max_train_steps:  # training goes on: an export in the dir is not of this trajectory's end
        remove_export(args.output_dir)
    inside = resume_path is not None and resume_path.resolve().parent == Path(args.output_dir).resolve()
    write_run_record(args.output_dir, run_config(args), resume_path.name if inside else None,
                     args.max_train_steps if run_length_schedules(args) else None, launch)
    if resume_path is None or not os.path.exists(os.path.join(args.output_dir, CALIBRATION_NAME)):
        save_calibration(calibration, args.output_dir, text_calibration)


def checkpoint(accelerator, args, step):
    return save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, **save_state_kwargs(accelerator))


def register_state_hooks(accelerator, run_info):
    """accelerate's save/load_state store only the ResLoRA state (not the frozen base), the text encoder's in a
    subfolder."""
    from transformers import PreTrainedModel

    def state_dir(model, output_dir):
        return os.path.join(output_dir, TEXT_ENCODER_STATE_DIR) if isinstance(model, PreTrainedModel) else output_dir

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                model = accelerator.unwrap_model(model)
                save_training_state(model, state_dir(model, output_dir), extra=run_info)
        while weights:
            weights.pop()  # only the ResLoRA state, not the frozen base

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            load_training_state(model, state_dir(model, input_dir))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    return load_model_hook


# ----------------------------------------------------------------------------------------- data
def load_raw_dataset(args):
    """A datasets.Dataset with image and caption columns, from an alias, the hub, a folder or the embedded set."""
    import datasets

    if args.train_data_dir or (args.dataset and os.path.isdir(args.dataset)):
        folder = args.train_data_dir or args.dataset
        check_metadata(folder)
        return datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=args.cache_dir)
    if args.dataset == EMBEDDED_DATASET and args.dataset_name is None:
        from reslora_diffusers.demo.pokemon_style import make_pokemon_style_dataset

        return make_pokemon_style_dataset(num_samples=args.pokemon_style_size, seed=args.seed, resolution=args.resolution)
    name = args.dataset_name or DATASET_ALIASES.get(args.dataset, args.dataset)
    try:
        return datasets.load_dataset(name, args.dataset_config_name, split="train", cache_dir=args.cache_dir)
    except Exception as err:  # offline, gated or missing
        raise TrainingError(
            f"Could not load dataset {name!r} from the Hugging Face hub ({type(err).__name__}: {str(err)[:300]}). "
            f"Offline choices: --dataset {EMBEDDED_DATASET} (embedded), or --train_data_dir / --dataset pointing "
            "to a local imagefolder with metadata.jsonl."
        ) from err


def load_training_data(args):
    """The dataset, checked: its columns, and every image with --on_bad_image error."""
    raw = load_raw_dataset(args)
    check_columns(raw, args.image_column, args.caption_column)
    raw = undecoded(raw, args.image_column)
    if args.max_train_samples is not None:
        raw = raw.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(raw))))
    if args.on_bad_image == "error":
        validate_images(raw, args.image_column)
    return raw


@torch.no_grad()
def build_calibration(args, dataset, vae, text_encoder, noise_scheduler, accelerator, weight_dtype):
    """Fixed UNet inputs, and their token ids (the text encoder's calibration inputs).

    The first half of the batches fits the ls merge, the second half measures merge error. The halves use
    different images (fit: the first readable examples; held out: the next ones); in each half the timesteps
    are stratified over the whole range (``calibration_batches``). Noise is fixed by the seed.
    """
    g = torch.Generator(device=accelerator.device).manual_seed(args.seed + 12345)
    size = max(1, min(args.train_batch_size, 4))
    readable = (e for e in (dataset[i] for i in range(len(dataset))) if "bad_index" not in e)
    text_batches = []

    def encode(group):
        batch = collate(group)
        text_batches.append((batch["input_ids"],))
        latents = encode_images(vae, batch["pixel_values"].to(accelerator.device, weight_dtype), g)
        return latents, text_encoder(batch["input_ids"].to(accelerator.device), return_dict=False)[0]

    batches = []
    half = args.calibration_batches // 2  # as split_calibration splits them (one batch: no first half)
    for num_batches in (half, args.calibration_batches - half):
        examples = [e for _, e in zip(range(num_batches * size), readable)]
        batches += calibration_batches(examples, encode, noise_scheduler, num_batches, g, accelerator.device)
    if not batches:
        raise TrainingError(
            f"No image of the dataset could be read ({len(dataset)} example(s), column {args.image_column!r}). Check the "
            "image files, or pass --image_column with the column that holds the images."
        )
    return batches, text_batches


# ---------------------------------------------------------------------------------------- model
def load_components(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = args.pretrained_model_name_or_path
    if path is None:
        from reslora_diffusers.demo.tiny_sd2 import TINY_BASE_PATH

        path = TINY_BASE_PATH
        if not os.path.isdir(path):
            raise TrainingError(f"The embedded base is missing at {path}; build it: python scripts/build_tiny_base.py --out {path}")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "model_index.json")):
        raise TrainingError(
            f"{path} is not a diffusers Stable Diffusion pipeline folder (no model_index.json). Point "
            "--pretrained_model_name_or_path at a pipeline saved with save_pretrained, or a hub id such as "
            "stabilityai/stable-diffusion-2."
        )
    refuse_sdxl(path, args.revision)
    kw = dict(revision=args.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError, EnvironmentError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(err).lower() or "connect" in str(err).lower()
        hint = (
            " The hub is not reachable: run without --pretrained_model_name_or_path to use the embedded tiny base, "
            "or pass a local pipeline folder." if offline else ""
        )
        raise TrainingError(
            f"Could not load a diffusers Stable Diffusion pipeline from {path!r} ({type(err).__name__}: "
            f"{str(err)[:300]}). It needs tokenizer/, text_encoder/, vae/, unet/ and scheduler/.{hint}"
        ) from err
    return path, tokenizer, text_encoder, vae, unet, scheduler


def refuse_sdxl(path, revision):
    """SDXL (two text encoders, time ids) is not supported by this script yet: say so before loading weights."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except Exception:  # unreachable or not a pipeline: load_components reports it
        return
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        raise TrainingError(
            f"{path} is an SDXL pipeline ({index.get('_class_name')}); SDXL (two text encoders, time ids) is not "
            "supported by this script yet. Use an SD 1.x/2.x pipeline."
        )


@dataclasses.dataclass
class Models:
    """The pipeline's parts on the device; ``trained`` are the ones with ResLoRA (the UNet, and the text encoder
    with --train_text_encoder). After ``accelerator.prepare`` the trained ones are the prepared (wrapped) modules."""

    path: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    weight_dtype: torch.dtype
    text_encoder_trained: bool = False

    @property
    def trained(self):
        return [self.unet, self.text_encoder] if self.text_encoder_trained else [self.unet]


def load_models(args, accelerator):
    """Load the pipeline, freeze it, move it to the device in the weight dtype and inject ResLoRA."""
    from diffusers.training_utils import cast_training_params

    path, tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype)
    models = Models(path, tokenizer, text_encoder, vae, unet, noise_scheduler, weight_dtype, args.train_text_encoder)
    inject_reslora(unet, args.reslora_config)
    if args.train_text_encoder:
        inject_reslora(text_encoder, dataclasses.replace(args.reslora_config, target_modules=TEXT_ENCODER_TARGET_MODULES))
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(models.trained, dtype=torch.float32)  # LoRA weights (and merge statistics) stay fp32
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers' default is non-reentrant: exact for is/ms
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return models


# ------------------------------------------------------------------------------------- optimizer
@dataclasses.dataclass
class Optimization:
    """What ``accelerator.prepare`` returns for the loop, and the epoch bookkeeping."""

    dataset: ImageCaptionDataset
    sampler: EpochShuffleSampler
    dataloader: object
    optimizer: object
    lr_scheduler: object
    params: list
    updates_per_epoch: int
    num_epochs: int


def steps_per_epoch(num_batches: int, num_processes: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch of ``num_batches`` batches: accelerate gives each process ceil(num_batches / N)
    of them (padding the last round), and a step takes ``gradient_accumulation_steps`` of those (or an epoch's rest)."""
    return math.ceil(math.ceil(num_batches / num_processes) / gradient_accumulation_steps)


def prepare_training(args, accelerator, models, raw):
    """The dataloader, optimizer and LR schedule, prepared by accelerate; fills --max_train_steps from the epochs."""
    from diffusers.optimization import get_scheduler

    dataset = ImageCaptionDataset(raw, args, models.tokenizer)
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
        num_workers=args.dataloader_num_workers, drop_last=False,
    )
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for model in models.trained for p in model.parameters() if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.max_train_steps is None:
        # before prepare: the dataloader is not yet split across the processes
        args.max_train_steps = args.num_train_epochs * steps_per_epoch(len(dataloader), accelerator.num_processes,
                                                                       args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    *trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(*models.trained, optimizer, dataloader, lr_scheduler)
    models.unet = trained[0]
    if args.train_text_encoder:
        models.text_encoder = trained[1]
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    return Optimization(dataset, sampler, dataloader, optimizer, lr_scheduler, params, updates_per_epoch, num_epochs)


def make_schedules(args, accelerator, models, optimizer, calibration, text_calibration):
    """One ShortcutSchedule per trained model: lambda for each step, and merge_at's in-place merge (on every rank,
    on the same fit half)."""
    schedules = [ShortcutSchedule(accelerator.unwrap_model(models.unet), args.max_train_steps, optimizer, args.merge,
                                  split_calibration(calibration)[0], unet_forward)]
    if args.train_text_encoder:
        schedules.append(ShortcutSchedule(accelerator.unwrap_model(models.text_encoder), args.max_train_steps, optimizer,
                                          args.merge, split_calibration(text_calibration)[0], text_encoder_forward))
    return schedules


# ------------------------------------------------------------------------------------- sampling
def sample_seeds(args):
    """The seeds every snapshot draws each sample prompt with."""
    return list(range(args.num_validation_images))


def sample_prompts(args):
    prompts = list(args.sample_prompts or DEFAULT_SAMPLE_PROMPTS)
    return [args.validation_prompt, *prompts] if args.validation_prompt else prompts


class Snapshots:
    """Samples of the fixed prompts x seeds during training, from the training UNet (no pipeline copy, no CPU
    autocast), in ``--sample_view``: the merged view or the model as trained; each snapshot redraws the grid."""

    def __init__(self, args, accelerator, models, calibration, text_calibration):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.args, self.accelerator = args, accelerator
        self.calibration, self.text_calibration = calibration, text_calibration
        self.prompts = sample_prompts(args)
        self.seeds = sample_seeds(args)
        self.unet = models.unet
        self.text_encoder = accelerator.unwrap_model(models.text_encoder)
        self.pipe = StableDiffusionPipeline(
            vae=models.vae, text_encoder=self.text_encoder, tokenizer=models.tokenizer,
            unet=accelerator.unwrap_model(models.unet), scheduler=DDIMScheduler.from_config(models.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.samples_dir = Path(args.output_dir) / "samples"
        self.last_step = None  # the step of the latest snapshot

    def _autocast(self):
        precision = self.accelerator.mixed_precision
        if precision == "no":  # fp32 weights: no autocast (on CPU it would switch to slow bf16)
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.accelerator.device.type, dtype=dtype)  # fp32 LoRA beside 16-bit weights

    def generate(self, pipe=None):
        rows = []
        for prompt in self.prompts:
            row = []
            for seed in self.seeds:
                g = torch.Generator(device=self.accelerator.device).manual_seed(seed)
                with self._autocast():
                    image = (pipe or self.pipe)(
                        prompt, num_inference_steps=self.args.sample_num_inference_steps,
                        guidance_scale=self.args.sample_guidance_scale, generator=g,
                        height=self.args.resolution, width=self.args.resolution,
                    ).images[0]
                row.append(image)
            rows.append(row)
        return rows

    @torch.no_grad()
    def snapshot(self, step):
        """Save samples of ``--sample_view`` (and the unmerged view on request) for ``step``, then redraw the grid."""
        model = self.accelerator.unwrap_model(self.unet)
        text_encoder = self.text_encoder if self.args.train_text_encoder else None
        was_training = model.training
        model.eval()
        self.text_encoder.eval()
        try:
            if self.args.sample_view == "trained":
                views = {"": self.generate()}
            else:
                views = {"": self.generate_merged(model, text_encoder)}
                if self.args.sample_unmerged and self.args.reslora_structure in ("is", "ms"):
                    views["unmerged"] = self.generate()
        finally:
            model.train(was_training)
            self.text_encoder.train(was_training and text_encoder is not None)
        self.last_step = step
        self.save(self.samples_dir / step_dir_name(step), views, step, "samples")
        return views[""]

    def generate_merged(self, model, text_encoder):
        """Samples of the merge an export at this step would give (``--merge``), the training weights untouched."""
        results = merge_pipeline(model, self.args.merge, self.calibration, text_encoder, self.text_calibration)
        with contextlib.ExitStack() as views_on:
            views_on.enter_context(merged_view(model, results["unet"]))
            if text_encoder is not None:
                views_on.enter_context(merged_view(text_encoder, results["text_encoder"]))
            return self.generate()

    @torch.no_grad()
    def export_snapshot(self, pipe, step):
        """Samples from a fresh pipeline that loaded the exported file: the grid's last column, "export"."""
        pipe.set_progress_bar_config(disable=True)
        self.save(self.samples_dir / EXPORT_SAMPLES_DIR, {"": self.generate(pipe)}, step, "export")

    def save(self, folder, views, step, tag):
        """Write the images of ``views`` ({subfolder: rows}), redraw the grid, send both to the trackers."""
        for sub, rows in views.items():
            (folder / sub).mkdir(parents=True, exist_ok=True)
            for i, row in enumerate(rows):
                for seed, image in zip(self.seeds, row):
                    atomic_save_image(image, str(folder / sub / f"prompt-{i:02d}_seed-{seed}.png"))
        atomic_write_text(json.dumps({"prompts": self.prompts, "seeds": self.seeds}, indent=2), str(folder / "prompts.json"))
        grid, unreadable = draw_progress_grid(self.samples_dir, self.prompts, self.seeds[0],
                                              Path(self.args.output_dir) / "progress_grid.png")
        if unreadable:
            self.accelerator.print(f"Left out of the progress grid, since an image could not be read: "
                                   f"{', '.join(unreadable)} (samples from an earlier, interrupted run).")
        log_images(self.accelerator, {tag: [im for row in views[""] for im in row], "progress_grid": [grid]}, step)


def draw_progress_grid(samples_dir: Path, prompts: list[str], seed: int, path: Path):
    """Write the prompts x snapshots grid of the ``seed`` samples to ``path``; returns (grid, the snapshot folders
    left out because one of their images is missing or unreadable)."""
    from PIL import Image

    from reslora_diffusers.demo.grids import make_grid

    folders = sorted(samples_dir.glob("step-*"))
    labels = [f"step {int(s.name.split('-')[1])}" for s in folders]
    if (samples_dir / EXPORT_SAMPLES_DIR).is_dir():
        folders.append(samples_dir / EXPORT_SAMPLES_DIR)
        labels.append("export")
    columns, kept_labels, unreadable = [], [], []
    for folder, label in zip(folders, labels):
        try:
            columns.append([Image.open(folder / f"prompt-{i:02d}_seed-{seed}.png").convert("RGB") for i in range(len(prompts))])
            kept_labels.append(label)
        except (OSError, ValueError):  # missing, truncated or not an image
            unreadable.append(folder.name)
    rows = [[column[i] for column in columns] for i in range(len(prompts))]
    grid = make_grid(rows, row_labels=prompts, col_labels=kept_labels)
    atomic_save_image(grid, str(path))
    return grid, unreadable


def log_images(accelerator, images, step):
    """Send ``{tag: [PIL images]}`` to the trackers, as diffusers' log_validation does."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for tag, ims in images.items():
                if len({im.size for im in ims}) == 1:
                    tracker.writer.add_images(tag, np.stack([np.asarray(im.convert("RGB")) for im in ims]), step,
                                              dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im) for im in ims] for tag, ims in images.items()}, step=step)


def sample_from_export(args, snapshots, model_path, export_dir, weight_dtype, step):
    """Reload the export with stock diffusers into a fresh pipeline and sample the fixed prompts and seeds."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_path, revision=args.revision, variant=args.variant, dtype=weight_dtype, safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if args.prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=args.prediction_type)
    weight_name = KOHYA_WEIGHT_NAME if args.export_format == "kohya" else DIFFUSERS_WEIGHT_NAME
    pipe.load_lora_weights(export_dir, weight_name=weight_name)
    snapshots.export_snapshot(pipe.to(snapshots.accelerator.device), step)


# ----------------------------------------------------------------------------------------- loop
class StopRequest:
    """Ctrl-C / SIGTERM while training: the first asks for a checkpoint after the current step, a second stops now."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signal = None  # the signal received by this process
        self.stopping = False  # some process received one: every rank checkpoints and leaves
        self._previous = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        self.accelerator.print(f"\nReceived signal {signum}: saving a checkpoint after this step, then exiting.")

    def requested(self):
        """True on every rank if any rank was asked to stop (a collective under DDP; no device sync otherwise)."""
        if self.accelerator.num_processes == 1:
            self.stopping = self.signal is not None
            return self.stopping
        flag = torch.tensor(1.0 if self.signal is not None else 0.0, device=self.accelerator.device)
        self.stopping = bool(self.accelerator.reduce(flag, "max") > 0)
        return self.stopping

    @property
    def exit_code(self):
        return 128 + int(self.signal or signal.SIGTERM)


@dataclasses.dataclass
class LoopState:
    """Where the loop is: optimizer steps done, the newest checkpoint, unreadable images seen."""

    global_step: int
    last_checkpoint: Optional[Path] = None
    bad_images: set = dataclasses.field(default_factory=set)


def all_finite(params):
    """One device tensor: every parameter is finite (no host sync until it is read)."""
    return torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()


def sync_merge_statistics(accelerator, models):
    """Average the 'bi' windows over processes (a collective: every rank calls it)."""
    if accelerator.num_processes > 1:
        for model in models:
            get_controller(model).sync_statistics()


def snapshot_all_ranks(accelerator, models, snapshots, step):
    sync_merge_statistics(accelerator, models.trained)  # on every rank, before the main process merges
    if snapshots is not None:
        snapshots.snapshot(step)


def micro_step(args, accelerator, models, opt, batch, global_step, micro):
    """Forward, backward and (at the end of an accumulation) the optimizer step of one micro-batch."""
    with accelerator.accumulate(*models.trained):
        gen = step_generator(args.seed, global_step, micro * accelerator.num_processes + accelerator.process_index,
                             accelerator.device)
        latents, hidden = encode_batch(models.vae, models.text_encoder, batch, models.weight_dtype, gen,
                                       args.train_text_encoder)
        loss = diffusion_loss(models.unet, models.noise_scheduler, latents, hidden, gen, args.snr_gamma,
                              args.noise_offset)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(opt.params, args.max_grad_norm)
        opt.optimizer.step()
        opt.lr_scheduler.step()
        opt.optimizer.zero_grad()
    return loss.detach()


def after_optimizer_step(args, accelerator, models, opt, schedules, snapshots, state, step_loss, progress, run_info):
    """Check the step, advance lambda, log, checkpoint and snapshot on their cadences."""
    # one host sync per step: the loss for the bar and whether the step (and the weights it made) is finite
    loss_value, finite = torch.stack([step_loss.detach().float(),
                                      (torch.isfinite(step_loss) & all_finite(opt.params)).float()]).tolist()
    if not finite:
        raise TrainingError(
            f"Non-finite loss ({loss_value}) or LoRA weights at step {state.global_step + 1}; stopping "
            f"without saving it and without an export. Last good checkpoint: {state.last_checkpoint or 'none'}. "
            "Lower --learning_rate, set --max_grad_norm, or use --mixed_precision bf16/no instead of fp16."
        )
    state.global_step += 1
    lam = [schedule.update(state.global_step) for schedule in schedules][0]  # the state after this step
    run_info["steps"] = state.global_step
    progress.update(1)
    logs = {"loss": loss_value, "lr": opt.lr_scheduler.get_last_lr()[0]}
    if args.shortcut_decay or args.merge_at:
        logs["shortcut_scale"] = lam
    progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
    accelerator.log(logs, step=state.global_step)
    if state.global_step % args.checkpointing_steps == 0:
        state.last_checkpoint = checkpoint(accelerator, args, state.global_step)
    if state.global_step % args.sample_steps == 0:
        snapshot_all_ranks(accelerator, models, snapshots, state.global_step)


def train_epoch(args, accelerator, models, opt, schedules, snapshots, state, stop, loader, progress, run_info):
    """One pass over ``loader``; leaves early at --max_train_steps or on a stop request (``stop.stopping``)."""
    micro = 0
    accumulated = torch.zeros((), device=accelerator.device)
    for batch in loader:
        state.bad_images.update(batch["bad_indices"])
        accumulated += micro_step(args, accelerator, models, opt, batch, state.global_step, micro) \
            / args.gradient_accumulation_steps
        micro += 1
        if not accelerator.sync_gradients:
            continue
        micro = 0
        step_loss = accelerator.reduce(accumulated, "mean")
        accumulated = torch.zeros((), device=accelerator.device)
        after_optimizer_step(args, accelerator, models, opt, schedules, snapshots, state, step_loss, progress, run_info)
        if args.simulate_interrupt_at_step == state.global_step:
            stop.signal = signal.SIGTERM
        if stop.requested() or state.global_step >= args.max_train_steps:
            return


def train(args, accelerator, models, opt, schedules, snapshots, state, resume_skip, run_info):
    """The epochs from the resumed step to --max_train_steps. Returns the process exit code (0: trained to the end)."""
    from tqdm.auto import tqdm

    first_epoch = state.global_step // opt.updates_per_epoch
    progress = tqdm(range(args.max_train_steps), initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    models.unet.train()
    models.text_encoder.train(args.train_text_encoder)
    with StopRequest(accelerator) as stop:
        try:
            # a resume at or past --max_train_steps trains nothing
            for epoch in range(first_epoch, opt.num_epochs) if state.global_step < args.max_train_steps else ():
                opt.sampler.use_epoch(epoch)
                opt.dataset.use_epoch(epoch)
                skip = resume_skip if epoch == first_epoch else 0
                loader = accelerator.skip_first_batches(opt.dataloader, skip) if skip else opt.dataloader
                train_epoch(args, accelerator, models, opt, schedules, snapshots, state, stop, loader, progress,
                            run_info)
                if stop.stopping:
                    if state.last_checkpoint is None or state.last_checkpoint.name != f"checkpoint-{state.global_step}":
                        state.last_checkpoint = checkpoint(accelerator, args, state.global_step)
                    accelerator.print(f"Stopped at step {state.global_step}; resume with --resume_from_checkpoint latest.")
                    return stop.exit_code
                if args.validation_epochs and (epoch + 1) % args.validation_epochs == 0 \
                        and state.global_step % args.sample_steps:
                    snapshot_all_ranks(accelerator, models, snapshots, state.global_step)
                if state.global_step >= args.max_train_steps:
                    break
        except (TrainingError, RunDirError) as err:
            accelerator.print(f"ERROR: {err}")
            return 1
        finally:
            progress.close()
            if state.bad_images:
                accelerator.print(f"Skipped {len(state.bad_images)} unreadable image(s) (--on_bad_image skip; the next "
                                  f"readable example took each one's place): {sorted(state.bad_images)[:20]}")
    return 0


# --------------------------------------------------------------------------------------- export
def export(args, accelerator, models, schedules, snapshots, state, calibration, text_calibration, card, run_info,
           elapsed):
    """Main process: the last snapshot, the training state, the merged export and samples from the exported file."""
    model = accelerator.unwrap_model(models.unet)
    if not (snapshots.samples_dir / step_dir_name(state.global_step)).is_dir():
        snapshots.snapshot(state.global_step)
    save_training_state(model, args.output_dir, extra=run_info)
    model.eval()
    trained_text_encoder = None
    if args.train_text_encoder:
        trained_text_encoder = accelerator.unwrap_model(models.text_encoder).eval()
        save_training_state(trained_text_encoder, os.path.join(args.output_dir, TEXT_ENCODER_STATE_DIR), extra=run_info)
    reports = {"merge_at_report": schedules[0].merge_report}
    if args.train_text_encoder:
        reports["text_encoder_merge_at_report"] = schedules[1].merge_report
    report = export_run(model, args.output_dir, args.merge, calibration, card=card, export_format=args.export_format,
                        text_encoder=trained_text_encoder, text_batches=text_calibration,
                        extra={"steps": state.global_step, "train_seconds": round(elapsed, 1),
                               "skipped_images": len(state.bad_images), **reports})
    sample_from_export(args, snapshots, models.path, args.output_dir, models.weight_dtype, state.global_step)
    accelerator.print(f"Done: {state.global_step} steps in {elapsed:.0f}s. Merged LoRA in {args.output_dir}.")
    accelerator.print(merge_summary(report, SAMPLES_ADVICE))


def upload(args, hub_repo_id):
    from huggingface_hub import upload_folder

    upload_folder(repo_id=hub_repo_id, folder_path=args.output_dir, token=args.hub_token,
                  commit_message="ResLoRA export", ignore_patterns=["checkpoint-*", ".*", args.logging_dir + "/*"])


def finish(accelerator, trained, exit_code):
    accelerator.wait_for_everyone()  # the other ranks wait for the export, then all leave together
    for model in trained:
        release_ddp_reducer(model)  # before end_training() destroys the process group: avoids a hang at exit
    accelerator.end_training()
    return exit_code


def run_card(args, model_path, hub_repo_id=None):
    """The model card's facts, also stored with every training state. A pushed run's card loads the LoRA from
    ``hub_repo_id``; the others from the folder the card is written to."""
    card = {"base_model": model_path, "dataset": args.dataset_name or args.train_data_dir or args.dataset,
            "structure": args.reslora_structure, "pre_num": args.pre_num, "rank": args.rank,
            "lora_alpha": args.lora_alpha, "resolution": args.resolution, "learning_rate": args.learning_rate,
            "seed": args.seed, "example_prompt": sample_prompts(args)[0], "shortcut_decay": args.shortcut_decay,
            "merge_at": args.merge_at,
            # the card's snippet draws the grid's first export sample with these
            "sample_settings": {"num_inference_steps": args.sample_num_inference_steps,
                                "guidance_scale": args.sample_guidance_scale,
                                "height": args.resolution, "width": args.resolution, "seed": sample_seeds(args)[0]}}
    if hub_repo_id:
        card["repo_or_path"] = hub_repo_id
    return card


def resume(args, accelerator, models, opt, resume_path, resume_step, load_model_hook):
    """Restore a checkpoint; returns how many micro-batches of the first epoch to skip."""
    from accelerate.utils import DistributedType

    accelerator.print(f"Resuming from {resume_path}")
    accelerator.load_state(str(resume_path), **load_state_kwargs(accelerator))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # its engine restores the weights, and
        load_model_hook(list(models.trained), str(resume_path))  # skips our hook: the merge statistics come from here
    return (resume_step % opt.updates_per_epoch) * args.gradient_accumulation_steps


# ----------------------------------------------------------------------------------------- main
def main(args):
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    report_to = resolve_report_to(args.report_to)
    check_optional_features(args)
    accelerator = make_accelerator(args, report_to)
    warn_if_cpu_is_shared(accelerator)
    hub_repo_id = create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    set_seed(args.seed)

    # everything that can be wrong with the inputs is checked before the first write to the output dir
    lock = acquire_lock(args.output_dir) if accelerator.is_main_process else None  # noqa: F841 (held until exit)
    resume_path, resume_step = check_run_folder(args, accelerator)
    raw = load_training_data(args)
    models = load_models(args, accelerator)
    card = run_card(args, models.path, hub_repo_id)
    run_info = {"pretrained_model_name_or_path": models.path, "revision": args.revision, "dataset": card["dataset"],
                "card": card, "steps": resume_step}
    load_model_hook = register_state_hooks(accelerator, run_info)
    opt = prepare_training(args, accelerator, models, raw)
    for folder in resumed_runs(args, resume_path):
        check_schedule_steps(folder, args.max_train_steps, run_length_schedules(args))
    if resume_step >= args.max_train_steps and export_complete(args.output_dir):
        accelerator.print(f"{args.output_dir} is trained to step {resume_step} (--max_train_steps {args.max_train_steps}) "
                          "and exported; nothing to do.")
        return finish(accelerator, models.trained, 0)
    calibration, text_calibration = build_calibration(args, opt.dataset, models.vae, models.text_encoder,
                                                      models.noise_scheduler, accelerator, models.weight_dtype)

    # from here on the run writes to its output dir
    if accelerator.is_main_process:
        claim_output_dir(args, resume_path, resume_step, calibration, text_calibration, launch_settings(accelerator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and report_to != "none":
        accelerator.init_trackers("reslora", config=tracker_config(args))
    resume_skip = resume(args, accelerator, models, opt, resume_path, resume_step, load_model_hook) if resume_path else 0
    state = LoopState(global_step=resume_step)  # 0 without a checkpoint
    schedules = make_schedules(args, accelerator, models, opt.optimizer, calibration, text_calibration)
    for schedule in schedules:
        schedule.update(state.global_step)
    snapshots = Snapshots(args, accelerator, models, calibration, text_calibration) if accelerator.is_main_process else None
    if snapshots is not None and state.global_step == 0:
        snapshots.snapshot(0)

    start = time.time()
    exit_code = train(args, accelerator, models, opt, schedules, snapshots, state, resume_skip, run_info)
    if exit_code:
        return exit_code
    elapsed = time.time() - start
    sync_merge_statistics(accelerator, models.trained)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export(args, accelerator, models, schedules, snapshots, state, calibration, text_calibration, card, run_info,
               elapsed)
        if hub_repo_id is not None:
            upload(args, hub_repo_id)
    return finish(accelerator, models.trained, 0)


def cli(argv=None):
    try:
        args = parse_args(argv)
        return main(args)
    except (TrainingError, RunDirError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    finally:  # a process group left to the interpreter's exit can hang once a peer is gone
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
