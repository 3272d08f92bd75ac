"""The fine-tuning driver of the transformers examples: one ResLoRA run as a sequence of small named steps.

An example describes what differs (model, data, metric) as a ``FineTuneTask``, built by a function
``build_task(args, accelerator)``. ``run(args, build_task)`` does the rest, the same for every example:

    setup_accelerator -> build_task -> build_model (inject ResLoRA) -> training_loader, calibration_inputs
    -> build_optimizer -> accelerator.prepare -> train (ShortcutSchedule, EvalHistory) -> merge_and_evaluate
    -> export -> check_stock_peft -> build_summary (one JSON line, also ``summary.json``)

Distributed: DDP and DeepSpeed ZeRO-1/2 run; FSDP, ZeRO-3 and DeepSpeed configs that disagree with the
flags are refused before any work (``integrations.distributed``). The scheduler's warmup and length are
scaled by the number of processes (the prepared scheduler steps once per process and optimizer step), the
'bi' windows are averaged over the ranks before the merge, and the DDP reducer is released at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..core.export import save_merged_lora, save_training_state
from ..core.merging import merge_reslora, merged_view
from ..core.model import get_controller, inject_reslora
from ..core.schedule import ShortcutSchedule
from .cli import add_reslora_args, reslora_config_from_args
from .distributed import check_training_setup, process_group_kwargs, release_ddp_reducer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- task
def _nothing(*_):
    return None


def _no_extras(_metrics: dict) -> dict:
    return {}


@dataclass
class FineTuneTask:
    """What an example provides to ``run``: its model, data and metric.

    ``evaluate(model, eval_data)`` returns a metrics dict (every process must call it: it gathers over
    processes); ``metric`` is the key reported as ``accuracy_*`` in the summary. A ``DataLoader``
    ``eval_data`` is prepared (sharded) by accelerate with the model; anything else is passed as is.
    """

    name: str  # the summary's "example", e.g. "llama"
    label: str  # the summary's "task": dataset or task name
    base_path: str  # hub id or local folder of the base model (the adapter's base_model_name_or_path)
    load_base: Callable[[], torch.nn.Module]  # a fresh base model: for training and for the stock-peft check
    train_set: Sequence
    collate: Callable
    eval_data: Any
    evaluate: Callable[[torch.nn.Module, Any], dict]
    metric: str
    task_type: str  # peft task type of the exported adapter, e.g. "CAUSAL_LM", "SEQ_CLS"
    target_modules: list[str]
    modules_to_save: Optional[list[str]] = None
    configure_model: Callable[[torch.nn.Module], None] = _nothing  # the training model, before injection
    save_extras: Callable[[str], None] = _nothing  # write more into the adapter folder (e.g. the tokenizer)
    summary_extras: Callable[[dict], dict] = _no_extras  # {"before_merge", "after_merge", "stock_peft"} -> keys


# ------------------------------------------------------------------------------------- flags
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The optimisation, evaluation and output flags (a "training" group)."""
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
    group.add_argument("--eval_steps", type=positive_int, default=None,
                       help="Also evaluate the unmerged model every N optimizer steps. Step 0 and the end of each "
                            "epoch are always evaluated; the summary's 'eval_history' lists {step, metric}.")
    group.add_argument("--output_dir", default=None, help="Where the merged adapter, state and summary go.")
    group.add_argument("--no_progress_bar", action="store_true", help="Disable the tqdm progress bar.")
    return parser


def finetune_parser(doc: str, *, model_help: str, target_modules: list[str], max_length: int,
                    offline_defaults: dict, training_defaults: dict) -> argparse.ArgumentParser:
    """A parser with the flags every example shares: model and data sizes, offline mode, ResLoRA, training.

    ``offline_defaults`` sets ``pretrain_steps``, ``hidden_size``, ``num_layers``, ``num_train`` and
    ``num_eval`` of the offline tiny task; ``training_defaults`` overrides training flags' defaults (not
    ResLoRA's: those are the same in every entry point).
    """
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help=model_help)
    parser.add_argument("--offline", action="store_true", help="Use the tiny embedded model and task.")
    parser.add_argument("--max_length", type=int, default=max_length)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--target_modules", nargs="+", default=list(target_modules))
    offline = parser.add_argument_group("offline mode")
    offline.add_argument("--offline_base_dir", default=None,
                         help="Cache of the pretrained tiny base (default: <output_dir>/base_model).")
    for name in ("pretrain_steps", "hidden_size", "num_layers", "num_train", "num_eval"):
        offline.add_argument(f"--offline_{name}", type=int, default=offline_defaults[name])
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (CPU runs).")
    add_reslora_args(parser)
    add_training_args(parser)
    parser.set_defaults(**training_defaults)
    return parser


def finish_args(args, name: str, hub_label: str):
    """Offline mode when no model is given; the default output folder ``outputs/<name>-<mode>-<structure>``."""
    args.offline = args.offline or args.model_name_or_path is None
    if args.output_dir is None:
        mode = "offline" if args.offline else hub_label
        args.output_dir = os.path.join("outputs", f"{name}-{mode}-{args.reslora_structure}")
    return args


# ------------------------------------------------------------------------------------- setup
def setup_accelerator(args):
    """The ``Accelerator`` of the run and its distributed mode; refuses unsupported modes before any work."""
    from accelerate import Accelerator

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              kwargs_handlers=process_group_kwargs())  # gloo for DeepSpeed without CUDA
    mode = check_training_setup(accelerator, args.gradient_accumulation_steps, args.max_grad_norm)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("distributed mode: %s, %d process(es)", mode, accelerator.num_processes)
    if args.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator, mode


# ------------------------------------------------------------------------------- offline base
RECIPE_FILE, REPORT_FILE = "offline_pretraining.json", "pretraining_report.json"


def offline_recipe_kwargs(args) -> dict:
    """The offline base's recipe flags as keyword arguments of a demo task's ``build_offline_base``."""
    return dict(hidden_size=args.offline_hidden_size, num_layers=args.offline_num_layers,
                pretrain_steps=args.offline_pretrain_steps, seed=args.seed)


def has_offline_base(base_dir: str, recipe: dict) -> bool:
    """Does ``base_dir`` hold a base pretrained with exactly ``recipe`` (its stamp file)?"""
    stamp = os.path.join(base_dir, RECIPE_FILE)
    if not (os.path.exists(os.path.join(base_dir, "config.json")) and os.path.exists(stamp)):
        return False
    with open(stamp) as f:
        return json.load(f) == recipe


def ensure_offline_base(base_dir: str, pretrain_and_save: Callable[..., dict], identity: dict, *, hidden_size: int,
                        num_layers: int, pretrain_steps: int, seed: int) -> None:
    """Pretrain a tiny offline base into ``base_dir`` unless it already holds one of the same recipe.

    The recipe is the sizes, steps and seed plus ``identity`` (the task's ``{"task", "version"}``);
    ``pretrain_and_save(base_dir, **sizes)`` builds, trains and saves the base and returns its pretraining
    metrics. The recipe goes to a stamp file, recipe and metrics to ``pretraining_report.json``.
    """
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, pretrain_steps=pretrain_steps, seed=seed)
    recipe = {"hidden_size": hidden_size, "num_layers": num_layers, "steps": pretrain_steps, "seed": seed, **identity}
    if has_offline_base(base_dir, recipe):
        return
    report = dict(recipe, **pretrain_and_save(base_dir, **sizes))
    with open(os.path.join(base_dir, RECIPE_FILE), "w") as f:
        json.dump(recipe, f)
    with open(os.path.join(base_dir, REPORT_FILE), "w") as f:
        json.dump(report, f)
    logger.info("pretrained the offline base: %s", report)


def pretrain_offline_base(model, train_set: Sequence, collate: Callable, *, steps: int, lr: float, seed: int,
                          lr_lambda: Optional[Callable[[int], float]] = None) -> None:
    """Train every weight of a tiny offline base for ``steps`` steps (AdamW, batch 64, clipping at 1, seeded order).

    ``lr_lambda`` (of the step) scales the learning rate when given. Leaves the model in eval mode.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda else None
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, collate_fn=collate,
                                         generator=generator)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            optimizer.zero_grad()
            step += 1
            if step >= steps:
                break
    model.eval()


def offline_base_path(args, accelerator, build_offline_base: Callable[..., None]) -> str:
    """The offline base's folder; the main process pretrains it there (cached) with the recipe flags."""
    base_path = args.offline_base_dir or os.path.join(args.output_dir, "base_model")
    if accelerator.is_main_process:
        build_offline_base(base_path, **offline_recipe_kwargs(args))
    accelerator.wait_for_everyone()
    return base_path


def build_model(args, task: FineTuneTask):
    """The seeded base model with ResLoRA injected (the ResLoRA flags and the task's targets)."""
    from accelerate.utils import set_seed

    set_seed(args.seed)
    model = task.load_base()
    task.configure_model(model)
    inject_reslora(model, reslora_config_from_args(args, task.target_modules, task.modules_to_save))
    return model


# -------------------------------------------------------------------------------------- data
def training_loader(task: FineTuneTask, args) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(args.seed)
    return torch.utils.data.DataLoader(task.train_set, shuffle=True, batch_size=args.per_device_train_batch_size,
                                       collate_fn=task.collate, generator=generator)


def calibration_inputs(task: FineTuneTask, args) -> list[dict]:
    """The first ``--calibration_batches`` training batches in order, without labels (the 'ls' fit, merge errors)."""
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=args.per_device_train_batch_size,
                                         collate_fn=task.collate)
    batches = []
    for batch in loader:
        if len(batches) >= args.calibration_batches:
            break
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    return batches


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def forward_logits(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits


# -------------------------------------------------------------------------------- optimizer
def training_steps(num_batches: int, args) -> tuple[int, int]:
    """(max_train_steps, num_train_epochs) from the loader length and the flags, as in HF examples."""
    per_epoch = max(1, math.ceil(num_batches / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        return args.num_train_epochs * per_epoch, args.num_train_epochs
    return args.max_train_steps, max(1, math.ceil(args.max_train_steps / per_epoch))


def build_optimizer(model, args, num_batches: int, num_processes: int):
    """AdamW over the trainable parameters and the scheduler; returns (trainable, optimizer, scheduler, steps, epochs).

    ``num_batches`` is the training loader's length per process. The prepared scheduler steps
    ``num_processes`` times per optimizer step, so its warmup and length are scaled alike.
    """
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    max_steps, num_epochs = training_steps(num_batches, args)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * num_processes,
                              num_training_steps=max_steps * num_processes)
    return trainable, optimizer, scheduler, max_steps, num_epochs


def prepare(accelerator, model, optimizer, loader, eval_data, scheduler):
    """``accelerator.prepare`` of the training objects, and of ``eval_data`` if it is a DataLoader (sharded)."""
    if isinstance(eval_data, torch.utils.data.DataLoader):
        return accelerator.prepare(model, optimizer, loader, eval_data, scheduler)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return model, optimizer, loader, eval_data, scheduler


# ---------------------------------------------------------------------------------- training
class EvalHistory:
    """Evaluations of the unmerged model during training, one per distinct optimizer step.

    ``evaluate()`` returns the task's metrics; ``metric(result)`` picks the number that goes into
    ``history`` as ``{"step": s, "metric": value}``. ``at(step)`` evaluates unless that step was already
    evaluated (then it returns the earlier result: the model has not changed); ``maybe(step)`` evaluates
    only every ``eval_steps`` steps (never when ``eval_steps`` is None). In a distributed run every process
    must make the same calls, since evaluation gathers over processes.
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


@dataclass
class Training:
    """The prepared objects of the training loop."""

    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    trainable: list
    shortcuts: ShortcutSchedule
    evals: EvalHistory
    max_steps: int
    num_epochs: int


@dataclass
class TrainResult:
    steps: int
    metrics: dict  # of the unmerged model at the end
    history: list = field(default_factory=list)  # {"epoch", "step", **metrics} per epoch
    seconds: float = 0.0  # the loop without its evaluations


def train_epoch(t: Training, accelerator, args, step: int, progress) -> int:
    """One pass over the loader (or until ``max_steps``); returns the optimizer steps done so far."""
    for batch in t.loader:
        with accelerator.accumulate(t.model):
            loss = t.model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(t.trainable, args.max_grad_norm)
            t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            t.shortcuts.update(step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            t.evals.maybe(step)
        if step >= t.max_steps:
            break
    return step


def train(t: Training, accelerator, args, metrics_before: dict) -> TrainResult:
    """The training loop: epochs of ``train_epoch``, the unmerged model evaluated at each epoch end."""
    from tqdm.auto import tqdm

    progress = tqdm(range(t.max_steps), disable=not accelerator.is_local_main_process or args.no_progress_bar,
                    desc=f"ResLoRA-{args.reslora_structure}")
    result = TrainResult(steps=0, metrics=metrics_before)
    t_loop, eval_seconds_before = time.perf_counter(), t.evals.seconds
    t.model.train()
    for epoch in range(t.num_epochs):
        result.steps = train_epoch(t, accelerator, args, result.steps, progress)
        result.metrics = t.evals.at(result.steps)
        result.history.append({"epoch": epoch, "step": result.steps, **result.metrics})
        accelerator.print(f"epoch {epoch} step {result.steps}: {json.dumps(result.metrics)}")
        if result.steps >= t.max_steps:
            break
    progress.close()
    result.seconds = time.perf_counter() - t_loop - (t.evals.seconds - eval_seconds_before)
    return result


# -------------------------------------------------------------------------------------- merge
def merge_with_report(model, args, calibration_batches: list, forward_fn: Callable = forward_logits):
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


def merge_and_evaluate(task: FineTuneTask, model, unwrapped, eval_data, calib: list, accelerator, args):
    """(merge result, merge error, metrics of the merged model)."""
    result, error = merge_with_report(unwrapped, args, calib)
    with merged_view(unwrapped, result):
        metrics = task.evaluate(model, eval_data)
    accelerator.print(f"merged ({error['method']}): {json.dumps(metrics)}; merge error {json.dumps(error)}")
    return result, error, metrics


def export(task: FineTuneTask, result, unwrapped, accelerator, args) -> str:
    """The merged plain LoRA in peft format and the ResLoRA training state (main process); the adapter folder."""
    adapter_dir = os.path.join(args.output_dir, "merged_adapter")
    if accelerator.is_main_process:
        base = os.path.abspath(task.base_path) if args.offline else task.base_path
        save_merged_lora(result, adapter_dir, format="peft", model=unwrapped, task_type=task.task_type,
                         base_model_name_or_path=base)
        save_training_state(unwrapped, os.path.join(args.output_dir, "reslora_training_state"),
                            extra={"task": task.label, "merge": args.merge})
        task.save_extras(adapter_dir)
    accelerator.wait_for_everyone()
    return adapter_dir


@torch.no_grad()
def collect_logits(model, batches: Iterable[dict], forward_fn: Callable = forward_logits) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return [forward_fn(model, b).detach().float().cpu() for b in batches]
    finally:
        model.train(was_training)


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) if a else 0.0


def check_stock_peft(task: FineTuneTask, adapter_dir: str, unwrapped, result, eval_data, compare: list, accelerator):
    """A fresh base + stock ``PeftModel.from_pretrained``: (stock model, its metrics, logit differences)."""
    from peft import PeftModel

    stock = PeftModel.from_pretrained(task.load_base(), adapter_dir).to(accelerator.device).eval()
    metrics = task.evaluate(stock, eval_data)
    logits_stock = collect_logits(stock, compare)
    logits_unmerged = collect_logits(unwrapped, compare)
    with merged_view(unwrapped, result):
        logits_merged = collect_logits(unwrapped, compare)
    accelerator.print(f"stock PeftModel.from_pretrained: {json.dumps(metrics)}")
    diffs = {"max_abs_logit_diff_stock_vs_merged": max_abs_diff(logits_stock, logits_merged),
             "max_abs_logit_diff_stock_vs_unmerged": max_abs_diff(logits_stock, logits_unmerged)}
    return stock, metrics, diffs


# ------------------------------------------------------------------------------------ summary
def build_summary(task: FineTuneTask, args, mode: str, metrics: dict, trained: TrainResult, merge_error: dict,
                  logit_diffs: dict, evals: EvalHistory, adapter_dir: str, seconds: float) -> dict:
    """The run's summary; ``metrics`` holds the metric dicts before_finetuning/before_merge/after_merge/stock_peft."""
    summary = {
        "example": task.name,
        "mode": "offline" if args.offline else "hub",
        "task": task.label,
        "structure": args.reslora_structure,
        "pre_num": args.pre_num,
        "rank": args.rank,
        "merge": args.merge,
        "steps": trained.steps,
        "distributed": mode,
        **{f"accuracy_{when}": m[task.metric] for when, m in metrics.items()},
        "merge_error": merge_error,
        **logit_diffs,
        "history": trained.history,
        "eval_history": evals.history,
        "train_seconds": round(trained.seconds, 3),
        "adapter_dir": adapter_dir,
        "base_model": task.base_path,
        "seconds": round(seconds, 2),
    }
    summary.update(task.summary_extras(metrics))
    return summary


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


# ---------------------------------------------------------------------------------------- run
def run(args, build_task: Callable[[Any, Any], FineTuneTask], return_state: bool = False):
    """One fine-tuning run of the task ``build_task(args, accelerator)``; returns the summary.

    With ``return_state`` also the trained model, the stock-peft model, the merge result and what the
    tests need to recompute the logits.
    """
    accelerator, mode = setup_accelerator(args)
    t_start = time.time()
    task = build_task(args, accelerator)
    model = build_model(args, task)
    loader, calibration = training_loader(task, args), calibration_inputs(task, args)
    trainable, optimizer, scheduler, max_steps, num_epochs = build_optimizer(
        model, args, math.ceil(len(loader) / accelerator.num_processes), accelerator.num_processes)
    model, optimizer, loader, eval_data, scheduler = prepare(accelerator, model, optimizer, loader, task.eval_data,
                                                             scheduler)
    unwrapped = accelerator.unwrap_model(model)
    logger.info("ResLoRA %s (pre_num=%d, r=%d) on %s: %d trainable parameters, %d steps", args.reslora_structure,
                args.pre_num, args.rank, task.target_modules, sum(p.numel() for p in trainable), max_steps)

    evals = EvalHistory(lambda: task.evaluate(model, eval_data), lambda m: m[task.metric], args.eval_steps)
    metrics = {"before_finetuning": evals.at(0)}  # B = 0: the base model
    accelerator.print(f"before fine-tuning: {json.dumps(metrics['before_finetuning'])}")
    calib = [to_device(b, accelerator.device) for b in calibration]
    shortcuts = ShortcutSchedule(unwrapped, max_steps, optimizer, args.merge, calib, forward_logits)
    shortcuts.update(0)
    training = Training(model, optimizer, scheduler, loader, trainable, shortcuts, evals, max_steps, num_epochs)
    trained = train(training, accelerator, args, metrics["before_finetuning"])
    metrics["before_merge"] = trained.metrics

    result, merge_error, metrics["after_merge"] = merge_and_evaluate(task, model, unwrapped, eval_data, calib,
                                                                     accelerator, args)
    adapter_dir = export(task, result, unwrapped, accelerator, args)
    compare = calib[:2]
    stock, metrics["stock_peft"], diffs = check_stock_peft(task, adapter_dir, unwrapped, result, eval_data, compare,
                                                           accelerator)
    summary = build_summary(task, args, mode, metrics, trained, merge_error, diffs, evals, adapter_dir,
                            time.time() - t_start)
    if accelerator.is_main_process:
        print_summary(summary, args.output_dir)
    accelerator.wait_for_everyone()
    release_ddp_reducer(model)  # the process group, not the DDP Reducer, must be the last to go (hang at exit)
    if not return_state:
        return summary
    return {"summary": summary, "model": unwrapped, "stock": stock, "merge_result": result, "task": task,
            "compare_batches": compare, "forward_fn": forward_logits, "accelerator": accelerator,
            "load_base": task.load_base}
