"""Merging ResLoRA into plain LoRA factors, with a report of what it cost.

Every merge gives, per adapted module, factors ``(A*, B*)`` with the scaling folded into ``B*``, so
the plain LoRA output is ``B* A* x``.

With ``shortcut_decay`` every shortcut term carries the current lambda, and so does every merge:
the ``is`` chain head becomes ``(1 + lambda) A``, the ``bi``/``bw`` coefficients and the ``ls`` matrices
are multiplied by lambda, and ``bs`` scales its earlier B's. At lambda = 0 every merge is exact plain LoRA.

- ``bs`` (any method): exact. ``A* = cat(A_n, A_{n-1}, ...)``, ``B* = s cat(B_n, B_{n-1}, ...)``,
  rank (m+1) r; optionally SVD-compressed to ``svd_rank`` with the error reported.
- ``is``/``ms`` replace the previous layers' activations by a multiple of the current input:
  ``no`` ignores the shortcut; ``bi`` uses ratios of mean activation norms recorded during training
  (paper eqs. 9 and 12); ``bw`` ratios of the Frobenius norms of the layers' weights ``W + s B A``
  (eqs. 11 and 13); ``ls`` fits a small matrix by least squares on calibration activations.
  A chain head of ``is`` is exact (x_{n-1} := x_n gives A* = 2 A).

``ls`` in detail. For ``is``, fit ``M`` (r x r) minimising ``sum ||A x_{n-1} - M A x_n||^2``;
``A* = (I + M) A``. For ``ms``, fit ``M_0..M_K`` (r x r each) minimising
``sum ||sum_{k>=1} A_{n-k} x_{n-k} - sum_{k>=0} M_k A_{n-k} x_n||^2``; ``A* = A_n + sum_k M_k A_{n-k}``.
Both contain the ``bi``/``bw`` choices (``M = a I``), so per layer the fit is never worse; with B of
full column rank the minimiser is the same for the error measured after B.

Re-merge a saved training run with ``python -m reslora_diffusers.integrations.merge OUTPUT_DIR --merge ls``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from .layer import ResLoRAVariant
from .model import calibration, get_controller


@dataclass
class MergeResult:
    """Plain LoRA factors per module name (scale folded into B) and the merge report."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    report: dict[str, Any] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {name: a.shape[0] for name, (a, _) in self.factors.items()}


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("sample", "logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"forward_fn must return a tensor or a model output with .sample/.logits, got {type(output)}.")


def _default_forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _weight_norm(v: ResLoRAVariant) -> torch.Tensor:
    """Frobenius norm of the layer's plain merged weight W + s B A, computed out of place."""
    a, b, s = v.lora_weights()
    weight = v.module.get_base_layer().weight
    return torch.linalg.matrix_norm((weight.float() + s * (b.float() @ a.float())))


def _ratio(num: Optional[torch.Tensor], den: Optional[torch.Tensor]) -> torch.Tensor:
    """num / den, falling back to 1 (the authors' rule) when a statistic is missing or zero."""
    if num is None or den is None:
        return torch.tensor(1.0)
    num, den = num.float().cpu(), den.float().cpu()
    return torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-30), torch.ones_like(den))


def _solve_ls(v: ResLoRAVariant) -> torch.Tensor:
    if v.gram is None:
        raise RuntimeError(
            f"The 'ls' merge has no calibration statistics for {v.name}: pass calibration batches to merge_reslora."
        )
    gram = v.gram
    ridge = 1e-8 * gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, v.cross.T).T  # (r, d) = cross @ gram^-1


def _merge_module(
    v: ResLoRAVariant, structure: str, method: str, bw_norms: dict, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(A*, B*, coefficients) of one module; ``lam`` is lambda, the weight of the shortcut terms.

    The reported coefficients are the shortcut's own (a*, or the mean diagonal of M), before lambda.
    """
    a, b, s = v.lora_weights()
    a, b = a.detach().float(), b.detach().float()
    if structure == "none" or lam == 0.0 or (structure in ("is", "ms") and method == "no"):
        return a, s * b, 0.0
    if structure == "bs":
        if not v.preds:
            return a, s * b, []
        a_star = torch.cat([a] + [p.lora_weights()[0].detach().float() for p in v.preds], dim=0)
        b_star = s * torch.cat([b] + [lam * p.lora_weights()[1].detach().float() for p in v.preds], dim=1)
        return a_star, b_star, [1.0] * len(v.preds)
    if structure == "is":
        if v.link is None:  # chain head: x_{n-1} := x_n exactly
            return (1 + lam) * a, s * b, 1.0
        if method == "ls":
            m = _solve_ls(v).float().to(a.device)
            return a + lam * (m @ a), s * b, (m.trace() / m.shape[0]).item()
        if method == "bi":
            alpha = _ratio(v.link.mean_norm(), v.mean_norm())
        else:  # bw: a* = f*_{n-2} / f*_{n-1}
            pp = v.link.link
            alpha = _ratio(bw_norms[pp.name], bw_norms[v.link.name]) if pp is not None else torch.tensor(1.0)
        return (1 + lam * alpha.item()) * a, s * b, alpha.item()
    # ms
    if not v.preds:
        return a, s * b, []
    pred_a = [p.lora_weights()[0].detach().float() for p in v.preds]
    if method == "ls":
        m = _solve_ls(v).float().to(a.device)
        r = a.shape[0]
        a_star = a.clone()
        for k, ak in enumerate([a] + pred_a):
            a_star = a_star + lam * (m[:, k * r : (k + 1) * r] @ ak)
        blocks = [m[:, k * r : (k + 1) * r] for k in range(len(pred_a) + 1)]
        return a_star, s * b, [(blk.trace() / r).item() for blk in blocks]
    if method == "bi":  # eq. 12: A* = (1 + sum_k f_{n-k} / f_n) A_n, f = mean norm of A-outputs
        alphas = [_ratio(p.mean_norm(), v.mean_norm()).item() for p in v.preds]
        return (1 + lam * sum(alphas)) * a, s * b, alphas
    # bw, eq. 13: A* = A_n + sum_k a_{n-k} A_{n-k}, a_{n-k} = f*_{n-k-1} / f*_{n-1}
    alphas = []
    for p in v.preds:
        before = p.link
        alphas.append(_ratio(bw_norms[before.name], bw_norms[v.link.name]).item() if before is not None else 1.0)
    a_star = a + lam * sum(al * ak for al, ak in zip(alphas, pred_a))
    return a_star, s * b, alphas


def svd_compress(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``b @ a`` and the relative Frobenius error of the truncation."""
    if rank >= a.shape[0]:
        return a, b, 0.0
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, sig, vh = torch.linalg.svd(rb @ ra.T)
    total = torch.linalg.vector_norm(sig)
    err = (torch.linalg.vector_norm(sig[rank:]) / total).item() if total > 0 else 0.0
    sqrt_sig = sig[:rank].sqrt()
    b_new = (qb @ u[:, :rank]) * sqrt_sig
    a_new = sqrt_sig[:, None] * (vh[:rank] @ qa.T)
    return a_new.contiguous(), b_new.contiguous(), err


@torch.no_grad()
def _run(model, batches, forward_fn) -> list[torch.Tensor]:
    return [_first_tensor(forward_fn(model, batch)).detach().float() for batch in batches]


def _rel(num: list[torch.Tensor], ref: list[torch.Tensor], base: Optional[list[torch.Tensor]] = None) -> float:
    err = math.sqrt(sum(float((n - r).pow(2).sum()) for n, r in zip(num, ref)))
    if base is None:
        den = math.sqrt(sum(float(r.pow(2).sum()) for r in ref))
    else:
        den = math.sqrt(sum(float((r - b).pow(2).sum()) for r, b in zip(ref, base)))
    return err / den if den > 0 else 0.0


def merge_reslora(
    model,
    method: str = "bi",
    calibration_batches: Optional[Iterable] = None,
    forward_fn: Optional[Callable] = None,
    svd_rank: Optional[int] = None,
) -> MergeResult:
    """Merge a ResLoRA model into plain LoRA factors.

    Args:
        model: a model given to ``inject_reslora`` (possibly wrapped).
        method: ``no``, ``bi``, ``bw`` or ``ls`` (``bs`` and ``none`` are exact whatever the method).
        calibration_batches: inputs for ``forward_fn``; required by ``ls``. When given, the report
            holds the relative output error of the merged model against the unmerged one on them.
        forward_fn: ``forward_fn(model, batch)`` returning the output to compare (default: ``model(**batch)``
            for dicts, ``model(*batch)`` for tuples, else ``model(batch)``).
        svd_rank: compress ``bs`` factors to this rank (reported error); others are left as they are.

    Under DDP, call ``get_controller(model).sync_statistics()`` on every rank first, so that the 'bi'
    windows are averaged over processes and every rank would merge identically.
    """
    from .config import MERGE_METHODS

    if method not in MERGE_METHODS:
        raise ValueError(f"Unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}.")
    if svd_rank is not None and not (isinstance(svd_rank, int) and svd_rank >= 1):
        raise ValueError(f"svd_rank must be a positive integer (the rank to compress bs factors to), got {svd_rank!r}.")
    controller = get_controller(model)
    structure = controller.config.structure
    forward_fn = forward_fn or _default_forward
    batches = list(calibration_batches) if calibration_batches is not None else None
    if structure != "none" and not controller.traced:
        if batches:
            with controller.use_view("train"):
                _run(model, batches[:1], forward_fn)
        if not controller.traced:
            raise RuntimeError(
                "ResLoRA chains are traced on the first forward pass; run one forward (or pass calibration_batches) "
                "before merging."
            )
    lam = controller.shortcut_scale
    exact = structure in ("none", "bs") or lam == 0.0  # lambda = 0: the model is plain LoRA already
    if method == "ls" and not exact:
        if not batches:
            raise ValueError("The 'ls' merge needs calibration_batches (a few training inputs).")
        was_training = model.training
        model.eval()
        try:
            with calibration(model), controller.use_view("train"):
                _run(model, batches, forward_fn)
        finally:
            model.train(was_training)

    bw_norms = {}
    if method == "bw" and not exact:
        bw_norms = {name: _weight_norm(v) for name, v in controller.variants.items()}
    factors, modules = {}, {}
    for name, v in controller.variants.items():
        a_star, b_star, alpha = _merge_module(v, structure, method, bw_norms, lam)
        entry = {"alpha": alpha, "rank": int(a_star.shape[0]), "linked": v.link.name if v.link else None}
        if structure == "bs" and svd_rank is not None:
            a_star, b_star, err = svd_compress(a_star, b_star, svd_rank)
            entry.update(rank=int(a_star.shape[0]), svd_relative_error=err)
        if structure in ("is", "ms") and method == "bi":
            entry["statistics_count"] = v.norm_count
        factors[name] = (a_star.contiguous(), b_star.contiguous())
        modules[name] = entry

    report: dict[str, Any] = {
        "structure": structure,
        "pre_num": controller.config.pre_num,
        "method": "exact" if exact else method,
        "shortcut_scale": lam,
        "modules": modules,
    }
    if structure == "bs" and svd_rank is not None:
        report["svd_rank"] = svd_rank
    if batches:
        report["calibration"] = merge_error(model, factors, batches, forward_fn)
    return MergeResult(factors=factors, report=report)


def merge_error(model, factors: dict, batches: list, forward_fn: Optional[Callable] = None) -> dict:
    """Relative output error of the merged (plain LoRA) model against the unmerged ResLoRA model.

    ``relative_output_error`` = ||merged - unmerged|| / ||unmerged||;
    ``relative_adapter_error`` = ||merged - unmerged|| / ||unmerged - base|| (the error against what the
    adapter changes).
    """
    controller = get_controller(model)
    forward_fn = forward_fn or _default_forward
    was_training = model.training
    model.eval()
    try:
        with controller.use_view("train"):
            unmerged = _run(model, batches, forward_fn)
        with controller.use_view("merged", factors):
            merged = _run(model, batches, forward_fn)
        with controller.use_view("base"):
            base = _run(model, batches, forward_fn)
    finally:
        model.train(was_training)
    return {
        "num_batches": len(batches),
        "relative_output_error": _rel(merged, unmerged),
        "relative_adapter_error": _rel(merged, unmerged, base),
    }


def merge_shortcuts_in_place(
    model, method: str = "ls", calibration_batches: Optional[Iterable] = None, forward_fn: Optional[Callable] = None
) -> MergeResult:
    """Merge-and-continue (``config.merge_at``): set each 'is'/'ms' layer's A to its merged A*, shortcuts off.

    From then on the model is plain LoRA (lambda stays 0, also after ``set_progress``), so training goes
    on from the merged factors and the final export is exact. The returned report holds the error of
    this one merge. Every process must call it with the same inputs (after ``sync_statistics`` for 'bi').
    The optimizer's moments still describe the old A; resetting them is the caller's choice.
    """
    controller = get_controller(model)
    if controller.config.structure not in ("is", "ms"):
        raise ValueError(f"Merging shortcuts in place applies to 'is'/'ms', not {controller.config.structure!r}.")
    if controller.shortcuts_merged:
        raise RuntimeError("The shortcuts of this model were already merged in place.")
    result = merge_reslora(model, method=method, calibration_batches=calibration_batches, forward_fn=forward_fn)
    with torch.no_grad():
        for name, v in controller.variants.items():
            a = v.lora_weights()[0]
            a.copy_(result.factors[name][0].to(a.device, a.dtype))  # B* = s B: B is unchanged for 'is'/'ms'
    controller.shortcuts_merged = True
    controller.shortcut_scale = 0.0
    return result


def merged_view(model, merge_result: MergeResult):
    """Context manager: the model runs as the plain LoRA that ``merge_result`` exports."""
    return get_controller(model).use_view("merged", merge_result.factors)
