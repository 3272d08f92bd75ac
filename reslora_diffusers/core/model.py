"""Injecting ResLoRA into a model and keeping its chains.

A *kind* is one projection type at every depth: the matched target suffix extended back to the
nearest numeric path component (``attn1.to_k`` and ``attn2.to_k`` differ; ``to_out.0`` is kept
whole; LLaMA's ``self_attn.q_proj``). A *chain* is a kind's layers in execution order, traced on
the first forward pass (in a diffusers UNet: down, mid, up, unlike registration order). A *link*
joins a layer to the chain's previous layer only if they are shape-compatible:

- ``bs``: equal weight shape (out, in);
- ``is``: equal input activation shape; ``ms``: equal input activation shape and equal rank.

Links cut a chain into segments; ``pre_num`` counts back inside a segment.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from .config import ResLoRAConfig
from .layer import ResLoRAVariant

CONTROLLER_ATTR = "_reslora_controller"


def _matched_suffix(name: str, target_modules) -> Optional[str]:
    if isinstance(target_modules, str):
        if re.fullmatch(target_modules, name) is None:
            return None
        parts = name.split(".")
        keep = 2 if len(parts) > 1 and parts[-1].isdigit() else 1
        return ".".join(parts[-keep:])
    for target in sorted(target_modules, key=len, reverse=True):
        if name == target or name.endswith("." + target):
            return target
    return None


def module_kind(name: str, target_modules) -> Optional[str]:
    """The chain key of module ``name``, or None if it is not a target.

    >>> module_kind("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", ["to_out.0"])
    'attn1.to_out.0'
    >>> module_kind("model.layers.3.self_attn.q_proj", ["q_proj"])
    'self_attn.q_proj'
    """
    suffix = _matched_suffix(name, target_modules)
    if suffix is None:
        return None
    parts = name.split(".")
    start = len(parts) - len(suffix.split("."))
    # walk back from the suffix's first component to the nearest numeric component (inclusive)
    i = start
    while i >= 0 and not parts[i].isdigit():
        i -= 1
    return ".".join(parts[i + 1 :])


class ResLoRAController:
    """Chains, per-forward caches and view switching of one ResLoRA model (not an nn.Module)."""

    def __init__(self, root: nn.Module, config: ResLoRAConfig, adapter_name: str = "default"):
        self.config = config
        self.adapter_name = adapter_name
        self.variants: dict[str, ResLoRAVariant] = {}
        self.chains: dict[str, list[ResLoRAVariant]] = {}  # kind -> execution order
        self.cache: dict[ResLoRAVariant, torch.Tensor] = {}
        self.generation = 0
        self.root_grad_enabled = True
        self.view = "train"  # "train" (ResLoRA), "merged" (plain LoRA factors), "base" (adapters off)
        self.merged_factors: Optional[dict] = None
        self.calibrating = False
        # lambda, the weight of every shortcut term (config.shortcut_decay); 0 once merged in place (merge_at)
        self.shortcut_scale = 1.0
        self.shortcuts_merged = False
        self.record_norms = True  # training forwards record 'bi' norms; a ShortcutSchedule thins this by step
        self._hook = root.register_forward_pre_hook(self._start_forward)

    # --------------------------------------------------------------- forward
    def _start_forward(self, module, args):
        self.cache.clear()
        self.generation += 1
        self.root_grad_enabled = torch.is_grad_enabled()

    def check_grad_mode(self, variant: ResLoRAVariant):
        if variant.module.training and self.root_grad_enabled and not torch.is_grad_enabled():
            raise RuntimeError(
                f"ResLoRA '{self.config.structure}' ({variant.name}) ran with autograd off inside a forward that has it "
                "on: this is reentrant gradient checkpointing, which gives wrong gradients for 'is'/'ms' because the "
                "shortcut activations come from the no-grad pass. Use non-reentrant checkpointing "
                "(torch.utils.checkpoint.checkpoint(..., use_reentrant=False); diffusers' "
                "enable_gradient_checkpointing() and transformers' gradient_checkpointing_enable() use it by default)."
            )

    def register_execution(self, variant: ResLoRAVariant, x: torch.Tensor):
        """Place a layer in its chain the first time it runs, and link it if shape-compatible."""
        chain = self.chains.setdefault(variant.kind, [])
        variant.position = len(chain)
        variant.input_shape = tuple(x.shape)
        prev = chain[-1] if chain else None
        chain.append(variant)
        self._set_link(variant, prev if prev is not None and self.compatible(prev, variant) else None)

    def _set_link(self, variant: ResLoRAVariant, link: Optional[ResLoRAVariant]):
        variant.link = link
        variant.preds = []
        node, limit = variant.link, self.config.pre_num
        if self.config.structure == "is":
            limit = 1
        while node is not None and (limit == -1 or len(variant.preds) < limit):
            variant.preds.append(node)
            node = node.link

    def compatible(self, prev: ResLoRAVariant, cur: ResLoRAVariant) -> bool:
        structure = self.config.structure
        if structure == "bs":
            return prev.weight_shape == cur.weight_shape
        if structure == "is":
            return prev.input_shape == cur.input_shape
        if structure == "ms":
            return prev.input_shape == cur.input_shape and prev.rank == cur.rank
        return False

    @property
    def traced(self) -> bool:
        return all(v.position is not None for v in self.variants.values())

    def chain_summary(self) -> dict:
        """Per kind: module names in execution order and the lengths of the linked segments."""
        summary = {}
        for kind, chain in self.chains.items():
            segments, run = [], 0
            for v in chain:
                if v.link is None and run:
                    segments.append(run)
                    run = 0
                run += 1
            segments.append(run)
            summary[kind] = {"order": [v.name for v in chain], "segments": segments}
        return summary

    def restore_chains(self, summary: dict, input_shapes: Optional[dict] = None):
        """Rebuild chains from ``chain_summary()`` output (e.g. when loading a training state)."""
        self.chains = {}
        for kind, entry in summary.items():
            chain = []
            for name in entry["order"]:
                if name not in self.variants:
                    raise ValueError(f"Saved ResLoRA chain names module {name!r}, which this model does not have.")
                chain.append(self.variants[name])
            self.chains[kind] = chain
            linked = []
            for seg in entry["segments"]:
                linked += [False] + [True] * (seg - 1)
            for pos, (v, has_link) in enumerate(zip(chain, linked)):
                v.position = pos
                if input_shapes and v.name in input_shapes:
                    v.input_shape = tuple(input_shapes[v.name])
                self._set_link(v, chain[pos - 1] if has_link else None)

    # --------------------------------------------------------------- schedule
    def set_progress(self, progress: float) -> float:
        """Set lambda for ``progress`` = step / max_train_steps (call before each step); returns it."""
        self.shortcut_scale = 0.0 if self.shortcuts_merged else self.config.shortcut_scale(progress)
        return self.shortcut_scale

    # ------------------------------------------------------------------ views
    @contextlib.contextmanager
    def use_view(self, view: str, factors: Optional[dict] = None) -> Iterator[None]:
        old = (self.view, self.merged_factors)
        self.view, self.merged_factors = view, factors if factors is not None else self.merged_factors
        try:
            yield
        finally:
            self.view, self.merged_factors = old

    def reset_statistics(self):
        for v in self.variants.values():
            v.norm_window, v.norm_count, v.gram, v.cross = None, 0, None, None

    def sync_statistics(self):
        """Average the 'bi' windows over processes so that every rank merges identically."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for v in sorted(self.variants.values(), key=lambda v: v.name):
            window = v.norm_window
            if window is None:
                continue
            torch.distributed.all_reduce(window)
            window /= world


def reslora_root(model: nn.Module) -> nn.Module:
    """Strip DDP/compile/accelerate wrappers and PeftModel down to the module that carries ResLoRA."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, CONTROLLER_ATTR):
            return model
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            base = getattr(model, "base_model", None)
            inner = getattr(base, "model", None) if base is not None else None
            if isinstance(inner, nn.Module):
                model = inner
            else:
                break
    return model


def get_controller(model: nn.Module) -> ResLoRAController:
    """The ResLoRA controller of ``model`` (wrapped by DDP, Accelerate or PeftModel or not)."""
    root = reslora_root(model)
    controller = getattr(root, CONTROLLER_ATTR, None)
    if controller is None:
        raise ValueError("This model has no ResLoRA layers: call reslora_diffusers.inject_reslora(model, config) first.")
    return controller


def inject_reslora(model: nn.Module, config: ResLoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Add ResLoRA to ``model`` in place and return it.

    ``model`` may be any nn.Module (a diffusers UNet, a transformers model, an nn.Sequential), which
    gets peft LoRA layers on ``config.target_modules``, or a ``peft.PeftModel`` whose LoRA layers are
    reused. Only the LoRA parameters (and ``modules_to_save``) stay trainable.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    if not isinstance(config, ResLoRAConfig):
        raise TypeError(f"config must be a ResLoRAConfig, got {type(config).__name__}.")
    root = reslora_root(model)
    if hasattr(root, CONTROLLER_ATTR):
        raise ValueError("This model already has ResLoRA injected.")
    was_training = root.training
    has_lora = any(isinstance(m, LoraLayer) for m in root.modules())
    if not has_lora:
        from peft import inject_adapter_in_model

        try:
            inject_adapter_in_model(config.to_lora_config(), root, adapter_name=adapter_name)
        except ValueError as err:
            names = sorted({n.split(".")[-1] for n, m in root.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"{err}\nnn.Linear module names in this model: {names[:40]}") from err
        root.train(was_training)  # new peft layers start in training mode; keep the model's mode

    controller = ResLoRAController(root, config, adapter_name)
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(f"ResLoRA supports nn.Linear targets only; {name} is a {type(module).__name__}.")
        kind = module_kind(name, config.target_modules)
        if kind is None:
            warnings.warn(f"LoRA layer {name} does not match target_modules {config.target_modules}; chained alone.")
            kind = name
        variant = ResLoRAVariant(controller, name, module, kind)
        module.lora_variant[adapter_name] = variant
        controller.variants[name] = variant
    if not controller.variants:
        raise ValueError(f"No nn.Linear matched target_modules={config.target_modules}.")
    object.__setattr__(root, CONTROLLER_ATTR, controller)
    return model


def remove_reslora(model: nn.Module) -> nn.Module:
    """Detach ResLoRA, leaving the peft LoRA layers (and their weights) as plain LoRA."""
    controller = get_controller(model)
    for v in controller.variants.values():
        v.module.lora_variant.pop(controller.adapter_name, None)
    controller._hook.remove()
    controller.cache.clear()
    root = reslora_root(model)
    object.__delattr__(root, CONTROLLER_ATTR)
    return model


@contextlib.contextmanager
def calibration(model: nn.Module) -> Iterator[ResLoRAController]:
    """Within this context, forwards accumulate the statistics of the 'ls' merge (from zero)."""
    controller = get_controller(model)
    for v in controller.variants.values():
        v.gram = v.cross = None
    controller.calibrating = True
    try:
        yield controller
    finally:
        controller.calibrating = False
