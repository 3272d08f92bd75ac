"""A naive, unfused ResLoRA: forward hooks on stock peft LoRA layers (the baseline of step_overhead.py).

Each adapted ``peft.tuners.lora.Linear`` keeps its plain LoRA forward (no variant); a forward hook adds
the shortcut terms with one extra stock LoRA call per previous block:

- ``is``: + s B_n A_n x_{n-1}                    (x_{n-1} := x_n at a chain head, as in the paper)
- ``bs``: + s B_{n-k} A_{n-k} x_n       for k = 1..m
- ``ms``: + s B_n A_{n-k} x_{n-k}       for k = 1..m   (A_{n-k} x_{n-k} recomputed, not reused)

Chains are traced independently of ``reslora_diffusers`` on the first forward, per projection kind in
execution order, with the same shape rules (bs: equal weight shape; is: equal input shape; ms: equal
input shape and rank); ``pre_num`` counts back inside a linked run (``is`` uses one predecessor).
This is deliberately what a straightforward implementation does; it exists only to be timed against.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from reslora_diffusers.core.model import module_kind


class _Node:
    def __init__(self, name: str, module: nn.Module, kind: str):
        self.name = name
        self.module = module
        self.kind = kind
        self.traced = False
        self.preds: list["_Node"] = []
        self.run: list["_Node"] = []
        self.input_shape: Optional[tuple] = None

    @property
    def weight_shape(self):
        return tuple(self.module.base_layer.weight.shape)


class NaiveResLoRA:
    """Attach/detach hook-based ResLoRA on a model that already has peft LoRA layers."""

    def __init__(self, model: nn.Module, structure: str, pre_num: int, target_modules, adapter: str = "default"):
        from peft.tuners.lora.layer import Linear as LoraLinear

        if structure not in ("is", "bs", "ms"):
            raise ValueError(structure)
        self.model = model
        self.structure = structure
        self.pre_num = 1 if structure == "is" else pre_num
        self.adapter = adapter
        self.nodes: dict[nn.Module, _Node] = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear) and adapter in module.lora_A:
                if module.lora_variant.get(adapter) is not None:
                    raise ValueError(f"{name} carries a LoRA variant; the naive baseline needs stock peft LoRA layers.")
                self.nodes[module] = _Node(name, module, module_kind(name, target_modules) or name)
        self.chains: dict[str, list[_Node]] = {}
        self.cache: dict[_Node, torch.Tensor] = {}
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def attach(self):
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._start))
        for module in self.nodes:
            self._handles.append(module.register_forward_hook(self._hook))
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.cache.clear()
        return self

    def _start(self, module, args):
        self.cache.clear()

    def _trace(self, node: _Node, x: torch.Tensor):
        chain = self.chains.setdefault(node.kind, [])
        node.input_shape = tuple(x.shape)
        prev = chain[-1] if chain else None
        chain.append(node)
        node.traced = True
        if prev is None:
            return
        if self.structure == "bs":
            ok = prev.weight_shape == node.weight_shape
        elif self.structure == "is":
            ok = prev.input_shape == node.input_shape
        else:
            ok = prev.input_shape == node.input_shape and prev.module.r[self.adapter] == node.module.r[self.adapter]
        if ok:
            node.run = [prev] + prev.run  # the whole linked run before this node, nearest first
            node.preds = node.run if self.pre_num == -1 else node.run[: self.pre_num]

    def _hook(self, module, args, output):
        node = self.nodes[module]
        x = args[0]
        if not node.traced:
            self._trace(node, x)
        ad = self.adapter
        s = module.scaling[ad]
        if self.structure == "is":
            x_prev = self.cache[node.preds[0]] if node.preds else x
            self.cache[node] = x
            return output + module.lora_B[ad](module.lora_A[ad](x_prev)) * s
        if self.structure == "bs":
            for p in node.preds:
                output = output + p.module.lora_B[ad](p.module.lora_A[ad](x)) * s
            return output
        # ms
        self.cache[node] = x
        for p in node.preds:
            output = output + module.lora_B[ad](p.module.lora_A[ad](self.cache[p])) * s
        return output

    def links(self) -> int:
        return sum(len(n.preds) for n in self.nodes.values())
