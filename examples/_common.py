"""Code shared by the transformers examples (``train_roberta_glue_reslora.py``, ``train_llama_reslora.py``).

- the ResLoRA and training command-line flags;
- the start-up refusal of distributed modes ResLoRA does not support (FSDP, DeepSpeed ZeRO-3, ...);
- evaluation of the unmerged model during training (step 0, every ``--eval_steps`` steps, epoch ends);
- merging with a report, comparing logits, and the one-line JSON summary the tests parse.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

try:  # the examples run from a checkout without installing the package
    import reslora_diffusers  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the example is started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reslora_diffusers import (  # noqa: E402
    MERGE_METHODS,
    STRUCTURES,
    ResLoRAConfig,
    ShortcutSchedule,
    merge_reslora,
)
from reslora_diffusers.core.model import get_controller  # noqa: E402
from reslora_diffusers.integrations.distributed import (  # noqa: E402,F401
    UnsupportedDistributedMode,
    check_deepspeed_config,
    check_distributed_mode,
    check_training_setup,
    process_group_kwargs,
    release_ddp_reducer,
)
from reslora_diffusers.integrations.cli import add_reslora_args as _shared_reslora_args  # noqa: E402

# ---------------------------------------------------------------------------------------- CLI
def add_reslora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("ResLoRA")
    group.add_argument("--structure", choices=STRUCTURES, default="is",
                       help="'none' plain LoRA, 'is' input-shortcut, 'bs' block-shortcut, 'ms' middle-shortcut.")
    group.add_argument("--pre_num", type=int, default=1,
                       help="Number of previous blocks a 'bs'/'ms' block uses (-1: all). 'is' always uses 1.")
    group.add_argument("--rank", type=int, default=4, help="LoRA rank r.")
    group.add_argument("--lora_alpha", type=float, default=8, help="LoRA alpha (scaling = alpha / r).")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    group.add_argument("--merge", choices=MERGE_METHODS, default="bi",
                       help="How 'is'/'ms' are merged into plain LoRA: 'bi' input norms, 'bw' weight norms, "
                            "'ls' least squares on calibration batches, 'no' drop the shortcuts. 'bs' is exact.")
    group.add_argument("--num_calibration_batches", type=int, default=4,
                       help="Training batches used to fit the 'ls' merge and to measure every merge's error.")
    group.add_argument("--shortcut_decay", type=float, nargs=2, default=None)
    group.add_argument("--merge_at", type=float, default=None)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("training")
    group.add_argument("--learning_rate", type=float, default=5e-4)
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument("--num_train_epochs", type=int, default=3)
    group.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs when given.")
    group.add_argument("--per_device_train_batch_size", type=int, default=32)
    group.add_argument("--per_device_eval_batch_size", type=int, default=64)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--lr_scheduler_type", default="linear",
                       choices=["linear", "cosine", "constant", "constant_with_warmup"])
    group.add_argument("--num_warmup_steps", type=int, default=0)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--eval_steps", type=_positive_int, default=None,
                       help="Also evaluate the unmerged model every N optimizer steps. Step 0 and the end of each "
                            "epoch are always evaluated; the summary's 'eval_history' lists {step, metric}.")
    group.add_argument("--output_dir", default=None, help="Where the merged adapter, state and summary go.")
    group.add_argument("--no_progress_bar", action="store_true", help="Disable the tqdm progress bar.")
    return parser


def reslora_config_from_args(args, target_modules: list[str], modules_to_save: Optional[list[str]] = None) -> ResLoRAConfig:
    return ResLoRAConfig(
        structure=args.structure,
        pre_num=args.pre_num,
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        shortcut_decay=tuple(args.shortcut_decay) if args.shortcut_decay else None,
        merge_at=args.merge_at,
    )


# --------------------------------------------------------------------------- distributed mode
# ----------------------------------------------------------------------------------- training
def training_steps(num_batches: int, args) -> tuple[int, int]:
    """(max_train_steps, num_train_epochs) from the loader length and the flags, as in HF examples."""
    per_epoch = max(1, math.ceil(num_batches / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        return args.num_train_epochs * per_epoch, args.num_train_epochs
    return args.max_train_steps, max(1, math.ceil(args.max_train_steps / per_epoch))


class EvalHistory:
    """Evaluations of the unmerged model during training, one per distinct optimizer step.

    ``evaluate()`` returns the example's metrics (any object); ``metric(result)`` picks the number that
    goes into ``history`` as ``{"step": s, "metric": value}``. ``at(step)`` evaluates unless that step was
    already evaluated (then it returns the earlier result: the model has not changed); ``maybe(step)``
    evaluates only every ``eval_steps`` steps (never when ``eval_steps`` is None). In a distributed run
    every process must make the same calls, since evaluation gathers over processes.
    """

    def __init__(self, evaluate: Callable[[], Any], metric: Callable[[Any], float], eval_steps: Optional[int] = None):
        self._evaluate, self._metric, self.eval_steps = evaluate, metric, eval_steps
        self.history: list[dict] = []
        self.seconds = 0.0  # wall time spent evaluating
        self._last_step, self._last = None, None

    def at(self, step: int):
        if step != self._last_step:
            t0 = time.perf_counter()
            self._last, self._last_step = self._evaluate(), step
            self.seconds += time.perf_counter() - t0
            self.history.append({"step": step, "metric": float(self._metric(self._last))})
        return self._last

    def maybe(self, step: int):
        if self.eval_steps and step % self.eval_steps == 0:
            return self.at(step)
        return None


def start_shortcut_schedule(model, args, max_steps: int, optimizer, calibration_batches: list, forward_fn: Callable):
    """The ``ShortcutSchedule`` of a run (lambda of ``--shortcut_decay``, ``--merge_at``), updated for step 0.

    Call ``.update(step)`` after every optimizer step, on every process.
    """
    schedule = ShortcutSchedule(model, max_steps, optimizer, args.merge, calibration_batches, forward_fn)
    schedule.update(0)
    return schedule


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# -------------------------------------------------------------------------------------- merge
def merge_with_report(model, args, calibration_batches: list, forward_fn: Callable):
    """Merge ResLoRA into plain LoRA factors; the report always holds the calibration error.

    A collective under DDP: every rank calls it, and the 'bi' windows are averaged over the ranks first,
    so every rank merges alike.
    """
    get_controller(model).sync_statistics()
    result = merge_reslora(model, method=args.merge, calibration_batches=calibration_batches, forward_fn=forward_fn)
    calib = result.report.get("calibration", {})
    error = {
        "method": result.report["method"],
        "relative_output_error": calib.get("relative_output_error"),
        "relative_adapter_error": calib.get("relative_adapter_error"),
        "num_batches": calib.get("num_batches"),
        "max_rank": max(result.ranks().values()),
    }
    return result, error


@torch.no_grad()
def collect_logits(model, batches: Iterable[dict], forward_fn: Callable) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return [forward_fn(model, b).detach().float().cpu() for b in batches]
    finally:
        model.train(was_training)


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) if a else 0.0


# ------------------------------------------------------------------------------------ summary
def _json_safe(value: Any):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def print_summary(summary: dict, output_dir: Optional[str] = None) -> str:
    """Print the summary as one JSON line (and write ``summary.json``); returns the line."""
    line = json.dumps(_json_safe(summary), sort_keys=True)
    print(line, flush=True)
    if output_dir:
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            f.write(line + "\n")
    return line


def parse_summary(stdout: str) -> dict:
    """The last JSON summary line printed by an example."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"accuracy_after_merge"' in line:
            return json.loads(line)
    raise ValueError("No ResLoRA JSON summary line in the output.")
