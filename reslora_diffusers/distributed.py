"""Which distributed modes ResLoRA can train in, checked at start-up."""

from __future__ import annotations

SUPPORTED_MODES = "single process, multi-GPU (or multi-CPU) DDP, or DeepSpeed ZeRO stage 1/2"


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
