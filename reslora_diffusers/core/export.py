"""Saving and loading: the merged plain LoRA (diffusers or peft format) and the training state.

The merged export is an ordinary LoRA that stock diffusers/peft load. The training state (unmerged
weights, chains and merge statistics) is written under its own file names, never
``adapter_config.json``/``adapter_model.safetensors``, so stock peft cannot mistake it for a plain LoRA.
All files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .config import ResLoRAConfig
from .merging import MergeResult
from .model import reslora_root, get_controller, inject_reslora

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # lora_unet_*/lora_te1_* keys: ComfyUI, A1111
EXPORT_FORMATS = ("diffusers", "kohya", "both")
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
STATE_WEIGHT_NAME = "reslora_training_state.safetensors"
STATE_CONFIG_NAME = "reslora_training_state.json"
STATE_FORMAT_VERSION = 1


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_path(path: str):
    """A temporary file beside ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: str):
    """Give ``tmp`` the mode a plain ``open()`` would (mkstemp makes 0600), then rename it to ``path``."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def load_safetensors(path: str) -> dict:
    """``safetensors.load_file`` whose errors name the file."""
    try:
        return load_file(path)
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}).") from err


def read_json(path: str):
    """``json.load`` whose errors name the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({type(err).__name__}: {err}).") from err


def _write_atomically(path: str, write):
    """``write(tmp)`` a temporary file beside ``path``, then rename it into place (removed if anything fails)."""
    tmp = _atomic_path(path)
    try:
        write(tmp)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_file(tensors: dict, path: str, metadata: Optional[dict] = None):
    """``safetensors.save_file`` to a temporary file, then rename into place."""
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _write_atomically(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def atomic_write_text(text: str, path: str):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _write_atomically(path, write)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_save_image(image, path: str):
    """Save a PIL image as PNG through a temporary file, so ``path`` is never a truncated image."""
    _write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def _export_dtype(dtype: Optional[torch.dtype], tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None else tensor


def diffusers_lora_state_dict(result: MergeResult, prefix: str = "unet", dtype=None) -> dict[str, torch.Tensor]:
    """PEFT-style keys ``{prefix}.{module}.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r]."""
    state = {}
    for name, (a, b) in result.factors.items():
        state[f"{prefix}.{name}.lora_A.weight"] = _export_dtype(dtype, a)
        state[f"{prefix}.{name}.lora_B.weight"] = _export_dtype(dtype, b)
    return state


def kohya_lora_state_dict(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own ``convert_state_dict_to_kohya``, with one alpha for every module.

    The converter writes ``alpha`` = each module's rank (scale 1, right for our factors with the scale
    folded into B). But diffusers 0.42's kohya loader keeps only the most common alpha and drops the
    per-module ones, so a module of another rank (a ``bs`` export) would load with a wrong scale.
    So every alpha is set to the most common rank, and each other module's ``lora_up`` is multiplied by
    rank / alpha: every loader (diffusers, ComfyUI, A1111: scale = alpha / rank) computes the same B A.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya(diffusers_state)
    ranks = {k[: -len(".alpha")]: int(v) for k, v in state.items() if k.endswith(".alpha")}
    if not ranks:
        return state
    alpha = collections.Counter(ranks.values()).most_common(1)[0][0]
    for module, rank in ranks.items():
        state[f"{module}.alpha"] = torch.tensor(alpha)
        if rank != alpha:
            state[f"{module}.lora_up.weight"] = state[f"{module}.lora_up.weight"] * (rank / alpha)
    return state


def save_pipeline_lora(
    results: dict[str, MergeResult], save_directory: str, export_format: str = "both", dtype=None
) -> list[str]:
    """Write merged LoRAs of pipeline parts (``{"unet": ..., "text_encoder": ...}``, keys prefixed with the
    part's name) in one file per format.

    ``diffusers``: ``pytorch_lora_weights.safetensors`` (``unet.*``/``text_encoder.*`` keys); ``kohya``:
    ``pytorch_lora_weights_kohya.safetensors``; ``both``: the two. Returns the paths written.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {export_format!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    state = {}
    for prefix, result in results.items():
        state.update(diffusers_lora_state_dict(result, prefix, dtype))
    written = {
        DIFFUSERS_WEIGHT_NAME: lambda: state,
        KOHYA_WEIGHT_NAME: lambda: kohya_lora_state_dict(state),
    }
    names = {"diffusers": [DIFFUSERS_WEIGHT_NAME], "kohya": [KOHYA_WEIGHT_NAME]}.get(export_format, list(written))
    paths = []
    for name in names:
        path = os.path.join(save_directory, name)
        atomic_save_file(written[name](), path)
        paths.append(path)
    return paths


def _modules_to_save_state(model) -> dict[str, torch.Tensor]:
    """Full weights of peft ``modules_to_save`` wrappers, keyed as peft saves them."""
    from peft.utils.other import ModulesToSaveWrapper

    adapter = get_controller(model).adapter_name
    state = {}
    for name, module in reslora_root(model).named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for key, value in module.modules_to_save[adapter].state_dict().items():
                state[f"{name}.{key}"] = value
    return state


def save_merged_lora(
    result: MergeResult,
    save_directory: str,
    format: str = "diffusers",
    model=None,
    prefix: str = "unet",
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Write the merged plain LoRA; returns the weights file path.

    ``format="diffusers"``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``
    (scales are folded into lora_B, so diffusers' default alpha = rank is right).
    ``format="kohya"``: ``pytorch_lora_weights_kohya.safetensors`` (``lora_unet_*`` keys) for ComfyUI/A1111.
    ``format="peft"``: ``adapter_model.safetensors`` + a plain ``adapter_config.json`` for
    ``PeftModel.from_pretrained``; pass ``model`` to include ``modules_to_save`` weights.
    """
    os.makedirs(save_directory, exist_ok=True)
    if format in ("diffusers", "kohya"):
        return save_pipeline_lora({prefix: result}, save_directory, format, dtype)[0]
    if format != "peft":
        raise ValueError(f"Unknown export format {format!r}; use 'diffusers', 'kohya' or 'peft'.")

    from peft import LoraConfig

    ranks = result.ranks()
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    modules_to_save, extra = None, {}
    if model is not None:
        controller = get_controller(model)
        modules_to_save = controller.config.modules_to_save
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and controller.adapter_name in peft_config:
            pc = peft_config[controller.adapter_name]
            modules_to_save = pc.modules_to_save
            task_type = task_type or pc.task_type
            base_model_name_or_path = base_model_name_or_path or pc.base_model_name_or_path
        extra = _modules_to_save_state(model)
    config = LoraConfig(
        r=common,
        lora_alpha=common,
        target_modules=sorted(result.factors),
        rank_pattern={n: r for n, r in ranks.items() if r != common},
        alpha_pattern={n: r for n, r in ranks.items() if r != common},
        modules_to_save=modules_to_save,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    state = {}
    for name, (a, b) in result.factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = _export_dtype(dtype, a)
        state[f"base_model.model.{name}.lora_B.weight"] = _export_dtype(dtype, b)
    for key, value in extra.items():
        state[f"base_model.model.{key}"] = value
    path = os.path.join(save_directory, PEFT_WEIGHT_NAME)
    atomic_save_file(state, path, metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["peft_type"] = "LORA"
    config_dict["task_type"] = task_type
    config_dict["target_modules"] = sorted(result.factors)
    atomic_write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str), os.path.join(save_directory, PEFT_CONFIG_NAME))
    return path


def save_training_state(model, save_directory: str, extra: Optional[dict] = None) -> str:
    """Save the unmerged ResLoRA weights, chains and merge statistics (not loadable as plain LoRA)."""
    controller = get_controller(model)
    tensors, counts = {}, {}
    for name, v in controller.variants.items():
        a, b, _ = v.lora_weights()
        tensors[f"{name}.lora_A"] = a
        tensors[f"{name}.lora_B"] = b
        if v.norm_window is not None:
            tensors[f"{name}.norm_window"] = v.norm_window
        counts[name] = v.norm_count
    for key, value in _modules_to_save_state(model).items():
        tensors[f"modules_to_save::{key}"] = value
    meta = {
        "format": "reslora-training-state",
        "version": STATE_FORMAT_VERSION,
        "config": controller.config.to_dict(),
        "adapter_name": controller.adapter_name,
        "chains": controller.chain_summary() if controller.traced else None,
        "norm_counts": counts,
        "shortcut_scale": controller.shortcut_scale,
        "shortcuts_merged": controller.shortcuts_merged,
        "extra": extra or {},
    }
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, STATE_WEIGHT_NAME)
    atomic_save_file(tensors, path)
    meta["weights_sha256"] = file_sha256(path)  # the JSON, written last, vouches for the weights beside it
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True), os.path.join(save_directory, STATE_CONFIG_NAME))
    return path


def read_training_state_config(save_directory: str) -> dict:
    path = os.path.join(save_directory, STATE_CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No ResLoRA training state in {save_directory} (expected {STATE_CONFIG_NAME} and {STATE_WEIGHT_NAME})."
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != "reslora-training-state":
        raise ValueError(f"{path} is not a ResLoRA training state.")
    return meta


def load_training_state(model, save_directory: str):
    """Load a training state into ``model``, injecting ResLoRA with the saved config if needed."""
    from peft.utils.other import ModulesToSaveWrapper

    meta = read_training_state_config(save_directory)
    config = ResLoRAConfig.from_dict(meta["config"])
    try:
        controller = get_controller(model)
    except ValueError:
        inject_reslora(model, config, adapter_name=meta["adapter_name"])
        controller = get_controller(model)
    if controller.config.structure != config.structure or controller.config.pre_num != config.pre_num:
        raise ValueError(
            f"The saved state is ResLoRA '{config.structure}' pre_num={config.pre_num}, but the model has "
            f"'{controller.config.structure}' pre_num={controller.config.pre_num}."
        )
    weights = os.path.join(save_directory, STATE_WEIGHT_NAME)
    if meta.get("weights_sha256") not in (None, file_sha256(weights) if os.path.exists(weights) else None):
        raise ValueError(
            f"{weights} is not the file that {STATE_CONFIG_NAME} beside it was saved with (a save stopped between the "
            "two files). Resume the run from its latest checkpoint, which rewrites both, or load a checkpoint folder."
        )
    tensors = load_safetensors(weights)
    missing = [n for n in controller.variants if f"{n}.lora_A" not in tensors]
    if missing:
        raise ValueError(f"The saved state lacks ResLoRA modules {missing[:5]} (of {len(missing)}).")
    with torch.no_grad():
        for name, v in controller.variants.items():
            a, b, _ = v.lora_weights()
            a.copy_(tensors[f"{name}.lora_A"])
            b.copy_(tensors[f"{name}.lora_B"])
            window = tensors.get(f"{name}.norm_window")
            v.norm_window = window.to(a.device) if window is not None else None
            v.norm_count = int(meta["norm_counts"].get(name, 0))
        for name, module in reslora_root(model).named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                target = module.modules_to_save[controller.adapter_name]
                for key, value in target.state_dict().items():
                    saved = tensors.get(f"modules_to_save::{name}.{key}")
                    if saved is not None:
                        value.copy_(saved)
    if meta.get("chains"):
        controller.restore_chains(meta["chains"])
    controller.shortcut_scale = float(meta.get("shortcut_scale", 1.0))  # states before lambda: 1
    controller.shortcuts_merged = bool(meta.get("shortcuts_merged", False))
    return model
