"""Merge-aware training: the shortcut weight lambda over training, and the one in-place merge of ``merge_at``.

A training loop makes one ``ShortcutSchedule`` and calls ``update(step)`` once before its first step (after
a resume too) and after every optimizer step, with ``step`` the number of optimizer steps done. Then:

- lambda is ``config.shortcut_scale(step / max_steps)`` (``shortcut_decay``), so after the last step
  (progress 1) it is 0 and the export is exact;
- the 'bi' norms are recorded in every ``config.norm_every``-th step only (reading a whole activation per
  layer is what made 'is' slower than LoRA);
- with ``merge_at`` F, the first update at ``step >= round(F * max_steps)`` merges 'is'/'ms' in place
  (``merge_shortcuts_in_place``) and drops the AdamW moments of the changed A's, which described the old
  factors; from then on the model is plain LoRA. A resumed run restores ``shortcuts_merged`` from its
  checkpoint, so it never merges twice.

Under DDP every rank calls ``update`` with the same step and the same calibration batches, so the ranks
merge identically (the 'bi' windows are averaged first).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .merging import merge_shortcuts_in_place
from .model import get_controller


def reset_optimizer_state(optimizer, params) -> int:
    """Forget ``optimizer``'s per-parameter state (e.g. AdamW moments) of ``params``; returns how many."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):  # accelerate's wrapper
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"merge_at resets the optimizer moments of the merged factors, which needs a torch optimizer; got "
            f"{type(optimizer).__name__}. Use shortcut_decay instead (it needs no reset)."
        )
    ids = {id(p) for p in params}
    stale = [p for p in inner.state if id(p) in ids]
    if inner.state and not stale:
        raise RuntimeError(
            "merge_at: the optimizer keeps its state on other tensors than the model's LoRA parameters (as "
            "DeepSpeed ZeRO does), so the moments of the merged factors cannot be reset. Use shortcut_decay."
        )
    for p in stale:
        del inner.state[p]
    return len(stale)


class ShortcutSchedule:
    """Sets lambda for each step and performs ``merge_at``'s in-place merge; see the module docstring."""

    def __init__(self, model, max_steps: int, optimizer=None, merge_method: str = "ls",
                 calibration_batches: Optional[list] = None, forward_fn: Optional[Callable] = None):
        self.model, self.max_steps, self.optimizer = model, max(1, int(max_steps)), optimizer
        self.controller = get_controller(model)
        self.merge_method, self.calibration_batches, self.forward_fn = merge_method, calibration_batches, forward_fn
        merge_at = self.controller.config.merge_at
        self.merge_step = None if merge_at is None else max(1, round(merge_at * self.max_steps))
        self.merge_report: Optional[dict] = None  # the report of the in-place merge, once done

    def update(self, step: int) -> float:
        """Call with the number of optimizer steps done; returns lambda for the next step.

        The next step records the 'bi' norms only if ``step`` is a multiple of ``config.norm_every``: the
        same steps on every process, whatever the accumulation, and again after a resume.
        """
        ctl = self.controller
        ctl.record_norms = step % ctl.config.norm_every == 0
        if self.merge_step is not None and step >= self.merge_step and not ctl.shortcuts_merged:
            self.merge_now()
        return ctl.set_progress(step / self.max_steps)

    def merge_now(self):
        ctl = self.controller
        if self.merge_method == "bi":
            ctl.sync_statistics()
        result = merge_shortcuts_in_place(self.model, self.merge_method, self.calibration_batches, self.forward_fn)
        if self.optimizer is not None:
            reset_optimizer_state(self.optimizer, [v.lora_weights()[0] for v in ctl.variants.values()])
        self.merge_report = result.report
