"""Which distributed modes ResLoRA can train in (checked at start-up), and what each mode needs."""

from __future__ import annotations

import os

import torch

SUPPORTED_MODES = "single process, multi-GPU (or multi-CPU) DDP, or DeepSpeed ZeRO stage 1/2"


def process_group_kwargs() -> list:
    """Accelerate ``kwargs_handlers`` that let DeepSpeed run on a machine without CUDA (gloo).

    ``accelerate launch`` with a DeepSpeed config on a CPU-only machine leaves accelerate without a
    backend: it then counts 1 process while DeepSpeed sees the real world size, and DeepSpeed's
    batch-size check fails. Naming gloo fixes both. On CUDA (or when DeepSpeed is not used) this
    returns nothing and accelerate picks its backend as usual.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


class UnsupportedDistributedMode(RuntimeError):
    """Raised at start-up for a distributed mode that ResLoRA cannot train in."""


def check_distributed_mode(accelerator) -> str:
    """Refuse distributed modes that shard parameters per wrapped unit; return a short description.

    ``bs`` reads the LoRA weights of earlier layers and ``is``/``ms`` their activations inside one
    forward, which FSDP and DeepSpeed ZeRO-3 break (the neighbours' parameters are sharded away).
    ``accelerator`` is an ``accelerate.Accelerator`` (anything with ``distributed_type`` and
    ``state.deepspeed_plugin``).
    """
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    if dtype == DistributedType.NO:
        return "single process"
    if dtype == DistributedType.DEEPSPEED:
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        if stage in (0, 1, 2):
            return f"DeepSpeed ZeRO-{stage}"
        raise UnsupportedDistributedMode(
            f"ResLoRA does not support DeepSpeed ZeRO stage {stage}: ZeRO-3 shards each layer's parameters, but "
            "ResLoRA layers read their neighbours' LoRA weights and activations. Supported modes: "
            f"{SUPPORTED_MODES}. Set zero_stage to 1 or 2 in the DeepSpeed config (or `accelerate config`)."
        )
    name = getattr(dtype, "value", str(dtype))
    if str(name).startswith("MULTI_"):  # DDP on GPUs, CPUs (gloo), XPUs, NPUs, ...
        return f"DDP ({name})"
    raise UnsupportedDistributedMode(
        f"ResLoRA does not support distributed type {name}"
        + (" (FSDP shards parameters per wrapped unit, but ResLoRA layers read their neighbours' LoRA weights "
           "and activations)" if name == "FSDP" else "")
        + f". Supported modes: {SUPPORTED_MODES}. Relaunch with `accelerate launch` configured for one of them."
    )


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_deepspeed_config(accelerator, gradient_accumulation_steps: int, max_grad_norm: float | None) -> None:
    """Refuse a DeepSpeed config whose accumulation or clipping disagree with the script's flags.

    Under DeepSpeed, accelerate takes both from the DeepSpeed config: a different accumulation only
    logs a warning (and the script's step count and schedule would be off), and clipping is done by
    DeepSpeed with the config's ``gradient_clipping`` ("auto" means 1.0), not with ``--max_grad_norm``.
    """
    if not is_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    problems = []
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation != "auto" and int(accumulation) != gradient_accumulation_steps:
        problems.append(f"the DeepSpeed config has gradient_accumulation_steps {accumulation} but "
                        f"--gradient_accumulation_steps is {gradient_accumulation_steps}")
    clipping = config.get("gradient_clipping", "auto")
    clipping = 1.0 if clipping == "auto" else float(clipping)
    wanted = float(max_grad_norm or 0.0)
    if abs(clipping - wanted) > 1e-12 * max(1.0, wanted):
        problems.append(f"the DeepSpeed config clips gradients at {clipping:g} but --max_grad_norm is {wanted:g}")
    if problems:
        raise UnsupportedDistributedMode(
            "DeepSpeed settings disagree with the command line: " + "; ".join(problems) + ". Make them equal "
            "(`accelerate config`, or gradient_accumulation_steps / gradient_clipping in the DeepSpeed config)."
        )


def check_training_setup(accelerator, gradient_accumulation_steps: int, max_grad_norm: float | None) -> str:
    """:func:`check_distributed_mode`, then :func:`check_deepspeed_config`; returns the mode's description."""
    mode = check_distributed_mode(accelerator)
    check_deepspeed_config(accelerator, gradient_accumulation_steps, max_grad_norm)
    return mode


def save_state_kwargs(accelerator) -> dict:
    """Extra ``accelerator.save_state`` arguments: DeepSpeed checkpoints skip the frozen base weights."""
    return {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}


def load_state_kwargs(accelerator) -> dict:
    """Extra ``accelerator.load_state`` arguments matching :func:`save_state_kwargs`."""
    return {"load_module_strict": False} if is_deepspeed(accelerator) else {}


def release_ddp_reducer(model) -> None:
    """Free a DDP wrapper's gradient Reducer now, while the process group is still registered.

    ``accelerator.end_training()`` destroys the process group. If a DDP wrapper outlives it, freeing
    the wrapper later drops the Reducer's reference, the last one, to the gloo process group, whose
    destructor joins gloo's worker threads while holding the GIL. A worker still releasing a tensor
    needs the GIL, and the process hangs at exit (seen on 2 CPU processes with torch 2.13; see
    pytorch/pytorch#56297). Freed here, the Reducer is not the last owner. No-op for other models.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    for name in ("logger", "reducer"):  # DDP's C++ Logger also holds the Reducer
        if hasattr(model, name):
            delattr(model, name)
