"""ResLoRA as a peft LoRA variant: the training forward of one adapted nn.Linear.

A peft ``lora.Linear`` hands its LoRA work to ``module.lora_variant[adapter]``. ResLoRA puts a
``ResLoRAVariant`` there. The variant knows its predecessors in its chain only through plain Python
references, never as submodules, so the state dict keeps exactly plain LoRA's keys.

Equations (s = lora_alpha / r, n the block, m = pre_num, x_n the block's input):

- ``none``: h = W x + s B_n A_n x
- ``is``:   h = W x + s B_n A_n (x_n + x_{n-1}),  x_{n-1} := x_n at a chain head
- ``bs``:   h = W x + s (sum_{k=0..m} B_{n-k} A_{n-k}) x_n, one concatenated rank-(m+1)r matmul
- ``ms``:   h = W x + s B_n (sum_{k=0..m} A_{n-k} x_{n-k}), reusing the A-outputs of earlier blocks

With ``shortcut_decay`` every shortcut term (x_{n-1} in ``is``, the k >= 1 terms in ``bs``/``ms``) is
multiplied by lambda = ``controller.shortcut_scale``; at lambda = 0 every structure is plain LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

try:  # private peft API (pinned in requirements.txt)
    from peft.tuners.lora.layer import LoraVariant
except ImportError:  # pragma: no cover - only with an unsupported peft
    LoraVariant = object

if TYPE_CHECKING:
    from .model import ResLoRAController


def _shortcut_sum(x, x_prev, scale: float):
    """x + scale * x_prev in one kernel (scale is a Python float)."""
    return x + x_prev if scale == 1.0 else torch.add(x, x_prev, alpha=scale)


class _SumLinear(torch.autograd.Function):
    """``(x + scale * x_prev) @ A^T`` that saves only x and x_prev (which the base layers keep anyway), not the sum.

    Computing the sum outside would make autograd keep a new full-size activation per layer.
    """

    @staticmethod
    def forward(ctx, x, x_prev, weight, scale: float):
        ctx.save_for_backward(x, x_prev, weight)
        ctx.scale = scale
        return F.linear(_shortcut_sum(x, x_prev, scale), weight)

    @staticmethod
    def backward(ctx, grad):
        x, x_prev, weight = ctx.saved_tensors
        scale = ctx.scale
        grad = grad.to(weight.dtype)  # under autocast the output (and so grad) may be lower precision
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = (grad @ weight).to(x.dtype)
        if ctx.needs_input_grad[2]:
            total = _shortcut_sum(x, x_prev, scale).to(weight.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ total.reshape(-1, total.shape[-1])
        grad_prev = None
        if ctx.needs_input_grad[1]:
            grad_prev = grad_x if scale == 1.0 else scale * grad_x
        return grad_x if ctx.needs_input_grad[0] else None, grad_prev, grad_w, None


class ResLoRAVariant(LoraVariant):
    """The ResLoRA forward of one LoRA layer, linked to earlier layers of the same kind."""

    def __init__(self, controller: "ResLoRAController", name: str, module, kind: str):
        self.controller = controller
        self.name = name
        self.kind = kind
        self._module_ref = [module]  # a list, so the layer is never registered as a submodule
        self.position: Optional[int] = None  # index in the kind's execution order, set when first run
        self.link: Optional["ResLoRAVariant"] = None  # nearest predecessor if shape-compatible
        self.preds: list["ResLoRAVariant"] = []  # linked predecessors, nearest first (clipped to pre_num)
        self.input_shape: Optional[tuple] = None  # activation shape seen when traced (is/ms)
        # 'bi' merge statistics: a ring buffer of activation norms as a device tensor (no host sync)
        self.norm_window: Optional[torch.Tensor] = None
        self.norm_count = 0
        self._stat_generation = -1
        # 'ls' merge statistics (float64 Gram matrices), filled in calibration mode
        self.gram: Optional[torch.Tensor] = None
        self.cross: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ helpers
    @property
    def module(self):
        return self._module_ref[0]

    def lora_weights(self, adapter: Optional[str] = None):
        adapter = adapter or self.controller.adapter_name
        module = self.module
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]

    @property
    def weight_shape(self) -> tuple:
        a, b, _ = self.lora_weights()
        return (b.shape[0], a.shape[1])

    @property
    def rank(self) -> int:
        return self.lora_weights()[0].shape[0]

    # ----------------------------------------------------------- peft variant API
    @staticmethod
    def init(module, adapter_name, **kwargs):  # the layer is initialised by peft as plain LoRA
        pass

    def _refuse_weight_merge(self, *args, **kwargs):
        raise RuntimeError(
            "A ResLoRA layer cannot be merged into its base weight with peft's merge/fuse: the shortcuts read other "
            "layers. Use reslora_diffusers.merge_reslora(...) and save_merged_lora(...), then load the exported "
            "plain LoRA (which fuses normally)."
        )

    merge_safe = merge_unsafe = unmerge = _refuse_weight_merge

    def supports_lora_conversion(self) -> bool:
        return False

    # ------------------------------------------------------------------ forward
    def forward(self, module, *, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        ctl = self.controller
        if ctl.view == "base":
            return result
        if ctl.view == "merged":
            a_star, b_star = ctl.merged_factors[self.name]
            return result + F.linear(F.linear(x, a_star.to(x.dtype)), b_star.to(x.dtype))
        if self.position is None:
            ctl.register_execution(self, x)

        lora_a = module.lora_A[active_adapter]
        lora_b = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        structure = ctl.config.structure
        lam = ctl.shortcut_scale  # a Python float: no device sync

        if structure == "none" or lam == 0.0:  # lambda = 0: the shortcuts are off, plain LoRA
            return result + lora_b(lora_a(dropout(x))) * scaling

        if structure == "bs":
            if not self.preds:
                return result + lora_b(lora_a(dropout(x))) * scaling
            a_cat = torch.cat([lora_a.weight] + [p.module.lora_A[active_adapter].weight for p in self.preds], dim=0)
            pred_b = [p.module.lora_B[active_adapter].weight for p in self.preds]
            if lam != 1.0:
                pred_b = [lam * b for b in pred_b]
            b_cat = torch.cat([lora_b.weight] + pred_b, dim=1)
            return result + F.linear(F.linear(dropout(x), a_cat), b_cat) * scaling

        ctl.check_grad_mode(self)
        # once per forward (not on a checkpointing recompute), in the steps the schedule records
        record = module.training and ctl.record_norms and self._stat_generation != ctl.generation
        self._stat_generation = ctl.generation

        if structure == "is":
            x_prev = self.cached_from(self.link, x) if self.link is not None else x
            ctl.cache[self] = x
            if record:
                self.record_norm(x)
            if ctl.calibrating:
                self.accumulate_is(x, x_prev, lora_a.weight)
            if isinstance(dropout, torch.nn.Identity) and lora_a.bias is None:
                return result + lora_b(_SumLinear.apply(x, x_prev, lora_a.weight, lam)) * scaling
            return result + lora_b(lora_a(dropout(_shortcut_sum(x, x_prev, lam)))) * scaling

        # structure == "ms"
        u = lora_a(dropout(x))
        if record:
            self.record_norm(u)
        if ctl.config.pre_num == -1:
            # cache the running sum S_n = u_n + S_{n-1}: one add per layer for "all previous blocks"
            earlier = None if self.link is None else self.cached_from(self.link, u)
            ctl.cache[self] = running = u if earlier is None else u + earlier
            if earlier is None or lam == 1.0:
                total = running
            else:
                total = _shortcut_sum(u, earlier, lam)
        else:
            ctl.cache[self] = u
            earlier = None
            for p in self.preds:
                earlier_p = self.cached_from(p, u)
                earlier = earlier_p if earlier is None else earlier + earlier_p
            total = u if earlier is None else _shortcut_sum(u, earlier, lam)
        if ctl.calibrating and self.preds:
            self.accumulate_ms(x, earlier, active_adapter)
        return result + lora_b(total) * scaling

    # -------------------------------------------------------------- cross-layer
    def cached_from(self, pred: "ResLoRAVariant", like: torch.Tensor) -> torch.Tensor:
        """The activation ``pred`` stored in this forward, checked against this layer's shape."""
        cache = self.controller.cache
        if pred not in cache:
            raise RuntimeError(
                f"ResLoRA: {self.name} is linked to {pred.name}, which did not run earlier in this forward pass. "
                "ResLoRA chains follow the execution order traced on the first forward; call the whole model "
                "(not a submodule) so that layers run in that order."
            )
        value = cache[pred]
        if value.shape != like.shape:
            raise RuntimeError(
                f"ResLoRA: activation shape {tuple(value.shape)} of {pred.name} does not match "
                f"{tuple(like.shape)} of {self.name}, although they were linked when the chain was traced on "
                "the first forward. Inputs must keep the same relative shapes between layers as when traced."
            )
        return value

    @torch.no_grad()
    def record_norm(self, value: torch.Tensor):
        window = self.controller.config.merge_window
        if self.norm_window is None or self.norm_window.device != value.device:
            self.norm_window = torch.zeros(window, dtype=torch.float32, device=value.device)
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):  # accumulate low precision in fp32
            norm = torch.linalg.vector_norm(value, dtype=torch.float32)
        else:
            norm = torch.linalg.vector_norm(value).float()
        self.norm_window[self.norm_count % window] = norm
        self.norm_count += 1

    def mean_norm(self) -> Optional[torch.Tensor]:
        """Mean activation norm over the filled part of the window, or None without statistics."""
        if self.norm_window is None or self.norm_count == 0:
            return None
        filled = min(self.norm_count, self.norm_window.numel())
        return self.norm_window[:filled].mean()

    @torch.no_grad()
    def _accumulate(self, features: torch.Tensor, target: torch.Tensor):
        phi = features.reshape(-1, features.shape[-1]).double()
        tgt = target.reshape(-1, target.shape[-1]).double()
        if self.gram is None:
            self.gram = phi.new_zeros(phi.shape[1], phi.shape[1])
            self.cross = phi.new_zeros(tgt.shape[1], phi.shape[1])
        self.gram += phi.T @ phi
        self.cross += tgt.T @ phi

    def accumulate_is(self, x, x_prev, a_weight):
        """ls statistics for 'is': fit A x_{n-1} ~ M A x_n."""
        with torch.no_grad():
            self._accumulate(F.linear(x, a_weight), F.linear(x_prev, a_weight))

    def accumulate_ms(self, x, earlier, adapter):
        """ls statistics for 'ms': fit sum_k A_{n-k} x_{n-k} ~ sum_k M_k A_{n-k} x_n (k = 0..K)."""
        with torch.no_grad():
            weights = [self.module.lora_A[adapter].weight] + [p.module.lora_A[adapter].weight for p in self.preds]
            self._accumulate(F.linear(x, torch.cat(weights, dim=0)), earlier)
