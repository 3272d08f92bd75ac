"""The tuning protocol shared by convergence.py (SD) and transformers_convergence.py --tuned (LLaMA).

Nothing is selected on the seeds that are reported:

1. ``tune``: every arm at every learning rate of a factor-sqrt(2) grid on the tuning seeds. An arm's best
   rate has the best mean score over the tuning seeds; while it is at an edge of the grid, the grid grows
   by one sqrt(2) step on that side (``max_extend`` times). A best rate still at an edge is flagged.
2. ``select_families``: arms that differ only in a schedule window form a family; the best one is kept.
3. The selected arms run at their rates on fresh evaluation seeds; plain LoRA also at its rate / sqrt(2)
   and x sqrt(2), and the "LoRA oracle" is its best of the three per seed.
4. ``paired_table``: per arm, the metric minus LoRA's on the same seed (mean and standard error, and in
   how many seeds the arm is better), against the tuned LoRA and against the oracle.

A ``Metric`` says how to read a run: ``value`` (the exported model's metric), ``trained`` (the model as
trained), ``merge_error``, and ``sign``: +1 when lower is better (a loss), -1 when higher is (accuracy).
Arms need ``key``, ``label`` and ``family``; runs are dicts with ``arm``, ``lr`` and ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[dict], float]
    trained: Callable[[dict], float]
    merge_error: Callable[[dict], float]
    sign: int = 1  # +1: lower is better; -1: higher is better

    def score(self, r: dict) -> float:
        """Lower is better; a diverged run scores worst."""
        v = self.value(r)
        return self.sign * v if v is not None and math.isfinite(v) else float("inf")


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def grid_step(lr: float, k: int) -> float:
    return lr * SQRT2 ** k


def tune(arms, lrs, tune_seeds, run: Callable[[list], list], metric: Metric, max_extend: int):
    """Runs the tuning grid (``run`` takes (arm, lr, seed) triples and returns runs).

    Returns ({arm: {lr: mean score}}, {arm: best lr}, {arm: best still at an edge}).
    """
    results = {a.key: {} for a in arms}

    def add(triples):
        for r in run(triples):
            results[r["arm"]].setdefault(r["lr"], []).append(r)

    def mean(key, lr):
        return float(np.mean([metric.score(r) for r in results[key][lr]]))

    add([(a, lr, s) for a in arms for lr in lrs for s in tune_seeds])
    for _ in range(max_extend):
        extra = []
        for a in arms:
            grid = sorted(results[a.key])
            best = min(grid, key=lambda lr: mean(a.key, lr))
            if best == grid[0]:
                extra += [(a, grid_step(grid[0], -1), s) for s in tune_seeds]
            elif best == grid[-1]:
                extra += [(a, grid_step(grid[-1], 1), s) for s in tune_seeds]
        if not extra:
            break
        add(extra)
    scores = {k: {lr: mean(k, lr) for lr in by_lr} for k, by_lr in results.items()}
    best = {k: min(by_lr, key=by_lr.get) for k, by_lr in scores.items()}
    edge = {k: best[k] in (min(scores[k]), max(scores[k])) for k in scores}
    return scores, best, edge


def select_families(arms, scores, best):
    """One arm per family: the member with the best tuned score."""
    chosen = {}
    for a in arms:
        cur = chosen.get(a.family)
        if cur is None or scores[a.key][best[a.key]] < scores[cur.key][best[cur.key]]:
            chosen[a.family] = a
    return list(chosen.values())


def evaluation_triples(selected, best, eval_seeds, lora):
    """The selected arms at their rates, plus LoRA at its rate / sqrt(2) and x sqrt(2) (the oracle)."""
    triples = [(a, best[a.key], s) for a in selected for s in eval_seeds]
    return triples + [(lora, grid_step(best[lora.key], k), s) for k in (-1, 1) for s in eval_seeds]


def paired_table(eval_runs, selected, best, edge, metric: Metric, lora_key: str = "lora") -> tuple[list[dict], str]:
    by = {(r["arm"], r["seed"]): r for r in eval_runs if r["lr"] == best[r["arm"]]}
    seeds = sorted({s for (_, s) in by})
    lora = {s: metric.value(by[(lora_key, s)]) for s in seeds}
    oracle = {s: min((r for r in eval_runs if r["arm"] == lora_key and r["seed"] == s), key=metric.score)
              for s in seeds}
    oracle = {s: metric.value(r) for s, r in oracle.items()}
    rows, lines = [], [
        f"| arm | LR (tuned) | {metric.name} | vs tuned LoRA: mean ± SE (better in) | "
        "vs LoRA oracle: mean ± SE (better in) | as trained (unmerged) | merge error |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in selected:
        runs = [by[(a.key, s)] for s in seeds]
        values = [metric.value(r) for r in runs]
        diff = [v - lora[s] for v, s in zip(values, seeds)]
        odiff = [v - oracle[s] for v, s in zip(values, seeds)]
        row = {"arm": a.key, "label": a.label, "lr": best[a.key], "at_edge": edge[a.key], "value": mean_se(values),
               "vs_lora": mean_se(diff), "wins": sum(metric.sign * d < 0 for d in diff),
               "vs_oracle": mean_se(odiff), "oracle_wins": sum(metric.sign * d < 0 for d in odiff),
               "trained": mean_se([metric.trained(r) for r in runs]),
               "merge_error": float(np.mean([metric.merge_error(r) for r in runs])),
               "per_seed_diff": dict(zip(seeds, diff)), "per_seed_oracle_diff": dict(zip(seeds, odiff))}
        rows.append(row)
        flag = " (**edge**)" if row["at_edge"] else ""
        vs = "—" if a.key == lora_key else f"{row['vs_lora'][0]:+.4f} ± {row['vs_lora'][1]:.4f} ({row['wins']}/{len(seeds)})"
        lines.append(
            f"| {a.label} | {row['lr']:.4g}{flag} | {row['value'][0]:.4f} ± {row['value'][1]:.4f} | {vs} | "
            f"{row['vs_oracle'][0]:+.4f} ± {row['vs_oracle'][1]:.4f} ({row['oracle_wins']}/{len(seeds)}) | "
            f"{row['trained'][0]:.4f} | {row['merge_error']:.3g} |"
        )
    if any(r["at_edge"] for r in rows):
        lines += ["", "**WARNING**: an arm's best learning rate is at an edge of its grid (marked): its optimum is "
                      "not bracketed."]
    return rows, "\n".join(lines)


def sweep_table(scores: dict, labels: dict, metric: Metric) -> str:
    """Tuning: the mean metric over the tuning seeds per arm and LR; best in bold."""
    lrs = sorted({lr for by_lr in scores.values() for lr in by_lr})
    lines = ["| arm | " + " | ".join(f"{lr:.4g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for key, by_lr in scores.items():
        best = min(by_lr, key=by_lr.get)
        cells = [("**%.4f**" if lr == best else "%.4f") % (metric.sign * by_lr[lr]) if lr in by_lr else ""
                 for lr in lrs]
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
