#!/usr/bin/env python
"""LoRA vs ResLoRA on the offline transformers examples: RoBERTa accuracy and LLaMA exact match vs steps.

    python -m benchmarks.transformers_convergence            # full: both tasks, 4 arms, 5 seeds (<= 25 min)
    python -m benchmarks.transformers_convergence --quick    # both tasks, 4 arms, 2 seeds, 1 epoch (<= 5 min)
    python -m benchmarks.transformers_convergence --task llama --seeds 0 1 2
    python -m benchmarks.transformers_convergence --tuned    # LLaMA: does the exported adapter beat a tuned LoRA?
    python -m benchmarks.transformers_convergence --tuned --quick

``--tuned`` runs the protocol of ``benchmarks/_tuning.py`` on the LLaMA example (rank 4, alpha 8, batch 32,
linear schedule, ``--merge ls``): a bracketed factor-sqrt(2) learning-rate grid tuned on ``--tune_seeds``,
anneal windows chosen there too, then the selected arms on fresh ``--seeds`` (default 0..4) against the
tuned LoRA and a per-seed LoRA oracle. The metric is the exact match of the *exported* plain-LoRA adapter
(``accuracy_after_merge``, which the example checks equals a stock ``PeftModel.from_pretrained`` load).

Each run is one call in this process of the examples' offline mode as shipped in the package,
``reslora_diffusers.demo.tiny_roberta_task.train(argv)`` or ``tiny_llama_task.train(argv)`` (the examples'
flags, the offline task and the fine-tuning driver ``reslora_diffusers.integrations.transformers_finetune``),
with ``--eval_steps``, so the metric of the unmerged model is recorded every few optimizer steps (step 0 is
the base before fine-tuning). Arms:

- ``LoRA``: ``--reslora_structure none``, the plain peft LoRA layer;
- ``ResLoRA is`` / ``bs m=1`` / ``ms m=1``: ``--reslora_structure is|bs|ms --pre_num 1`` (the default m).

Every run passes ``--lora_alpha 8`` (the examples' default until the flags were unified; now alpha defaults
to the rank) and, unless ``--merge`` says otherwise, ``--merge bi`` (likewise; now ``ls``), so the results
stay comparable with the earlier ones. Everything else is the examples' default (rank 4, learning rate 3e-3,
batch 32, linear schedule, ``query,value`` / ``q_proj,v_proj``), and the same for every arm. A seed is the
example's ``--seed``: it fixes the offline base (pretrained once per seed and cached under
``<out>/bases`` or ``--bases``), the fine-tuning data, the LoRA initialisation and the data order, so within one
seed all arms see the same base, data and order; across seeds all of these vary. Within a seed the arm order
rotates with the seed index, so no arm always runs first on a machine whose load drifts.

At the end of a run the example merges the adapter into a plain LoRA and evaluates the merged model; that
is the "merged" metric. Wall time per step is the example's ``train_seconds`` (the training loop without the
evaluations) divided by the number of steps; runs are sequential, one torch thread by default.

Writes to ``--out`` (default ``benchmarks/results/transformers``, or ``..._quick``): ``curves.csv``
(task, arm, seed, step, metric, view: ``unmerged`` every eval step, ``merged`` once at the final step),
``runs.csv`` (one row per run), ``results.json``, ``<task>_convergence.png`` (mean and min-max band over
seeds vs step, per arm; the merged metric as a marker at the last step), ``results.md`` (also printed):
per task, final unmerged and merged metric (mean +- std over seeds), the paired difference to LoRA, the
steps each arm needs to first reach LoRA's final mean metric, and wall time per step. Each run's stdout
(the example's log and JSON summary) is kept in ``<out>/logs``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._tuning import SQRT2, Metric, evaluation_triples, paired_table, select_families, sweep_table, tune
from reslora_diffusers.demo import tiny_llama_task, tiny_roberta_task

ROOT = Path(__file__).resolve().parent.parent

ARMS = {  # name -> example flags
    "LoRA": ["--reslora_structure", "none"],
    "ResLoRA is": ["--reslora_structure", "is", "--pre_num", "1"],
    "ResLoRA bs m=1": ["--reslora_structure", "bs", "--pre_num", "1"],
    "ResLoRA ms m=1": ["--reslora_structure", "ms", "--pre_num", "1"],
}
# the alpha of every run: the examples' default before the flags were unified (alpha = rank since)
BENCH_ALPHA = ["--lora_alpha", "8"]
ARM_ALIASES = {"lora": "LoRA", "none": "LoRA", "is": "ResLoRA is", "bs1": "ResLoRA bs m=1", "ms1": "ResLoRA ms m=1"}
COLORS = {"LoRA": "#333333", "ResLoRA is": "#1f77b4", "ResLoRA bs m=1": "#d62728", "ResLoRA ms m=1": "#2ca02c"}

TASKS = {
    "roberta": dict(demo=tiny_roberta_task, metric="accuracy",
                    title="RoBERTa (offline tiny, more-C-than-D classification)"),
    "llama": dict(demo=tiny_llama_task, metric="exact match",
                  title="LLaMA (offline tiny, word problems, greedy exact match)"),
}
# steps: optimizer steps (the examples' defaults: roberta 3 epochs x 63, llama 4 epochs x 63);
# pretrain: the offline base's pretraining steps (the examples' defaults: 300 and 600).
FULL = dict(seeds=[0, 1, 2, 3, 4],
            roberta=dict(steps=189, eval_steps=9, pretrain=300),
            llama=dict(steps=252, eval_steps=21, pretrain=600))
QUICK = dict(seeds=[0, 1],
             roberta=dict(steps=63, eval_steps=7, pretrain=150),
             llama=dict(steps=63, eval_steps=9, pretrain=300))


@dataclass(frozen=True)
class TunedArm:
    key: str
    flags: tuple
    label: str
    family: str


def _tuned_arm(key, structure, pre_num, label, schedule=(), family=None):
    flags = ("--reslora_structure", structure, "--pre_num", str(pre_num), *schedule)
    return TunedArm(key, flags, label, family or key)


TUNED_ARMS = {a.key: a for a in [
    _tuned_arm("lora", "none", 1, "LoRA"),
    _tuned_arm("is", "is", 1, "ResLoRA is (ls merge)"),
    _tuned_arm("ms-1", "ms", -1, "ResLoRA ms m=-1 (ls merge)"),
    _tuned_arm("bs-1", "bs", -1, "ResLoRA bs m=-1"),
    _tuned_arm("is-d59", "is", 1, "ResLoRA is, decay 0.5-0.9", ("--shortcut_decay", "0.5", "0.9"), "is-decay"),
    _tuned_arm("is-d38", "is", 1, "ResLoRA is, decay 0.3-0.8", ("--shortcut_decay", "0.3", "0.8"), "is-decay"),
    _tuned_arm("ms-1-d59", "ms", -1, "ResLoRA ms m=-1, decay 0.5-0.9", ("--shortcut_decay", "0.5", "0.9"), "ms-decay"),
    _tuned_arm("ms-1-d38", "ms", -1, "ResLoRA ms m=-1, decay 0.3-0.8", ("--shortcut_decay", "0.3", "0.8"), "ms-decay"),
    _tuned_arm("is-m6", "is", 1, "ResLoRA is, merge at 0.6", ("--merge_at", "0.6")),
    _tuned_arm("ms-1-m6", "ms", -1, "ResLoRA ms m=-1, merge at 0.6", ("--merge_at", "0.6")),
]}
TUNED_FULL = dict(arms=[k for k in TUNED_ARMS if not k.endswith("-d38")], lrs=[3e-3 / SQRT2, 3e-3, 3e-3 * SQRT2], tune_seeds=[100, 101],
                  seeds=[0, 1, 2, 3, 4], steps=126, pretrain=600, max_extend=2)
TUNED_QUICK = dict(arms=["lora", "is", "is-d59"], lrs=[3e-3 / SQRT2, 3e-3, 3e-3 * SQRT2], tune_seeds=[100],
                   seeds=[0, 1], steps=32, pretrain=200, max_extend=0)
EXPORTED_EXACT_MATCH = Metric(
    "exported adapter exact match",
    value=lambda r: r["accuracy_after_merge"],
    trained=lambda r: r["accuracy_before_merge"],
    merge_error=lambda r: r["merge_error"]["relative_output_error"],
    sign=-1,
)


def run_tuned(args) -> int:
    """The --tuned protocol on the LLaMA example; writes results.md, runs.csv and summary.json to --out."""
    preset = TUNED_QUICK if args.quick else TUNED_FULL
    seeds = args.seeds or preset["seeds"]
    tune_seeds = args.tune_seeds or preset["tune_seeds"]
    if set(seeds) & set(tune_seeds):
        raise SystemExit("--tune_seeds and --seeds must differ: nothing is selected on the reported seeds.")
    arms = [TUNED_ARMS[k] for k in (args.tuned_arms or preset["arms"])]
    plan = dict(steps=args.steps or preset["steps"], eval_steps=args.eval_steps or 10 ** 9,
                pretrain=preset["pretrain"])
    out = args.out or ROOT / "benchmarks" / "results" / ("llama_tuned_quick" if args.quick else "llama_tuned")
    out.mkdir(parents=True, exist_ok=True)
    bases, start, runs = args.bases or out / "bases", time.perf_counter(), []

    def run(triples, phase="tune"):
        done = []
        for arm, lr, seed in triples:
            s = run_one("llama", arm.key, seed, plan, out, [*arm.flags, "--merge", "ls", "--learning_rate", repr(lr)],
                        bases, flags_given=True, slug=f"{phase}-{arm.key}-lr{lr:.4g}-seed{seed}")
            s.update(arm=arm.key, lr=lr, seed=seed, phase=phase)
            done.append(s)
            print(f"[{time.perf_counter() - start:7.1f}s] {phase} {arm.key} lr {lr:.4g} seed {seed}: trained "
                  f"{s['accuracy_before_merge']:.3f}, exported {s['accuracy_after_merge']:.3f}", file=sys.stderr, flush=True)
        runs.extend(done)
        return done

    max_extend = preset["max_extend"] if args.max_extend is None else args.max_extend
    scores, best, edge = tune(arms, args.lrs or preset["lrs"], tune_seeds, run, EXPORTED_EXACT_MATCH, max_extend)
    selected = select_families(arms, scores, best)
    eval_runs = run(evaluation_triples(selected, best, seeds, TUNED_ARMS["lora"]), phase="eval")
    rows, table = paired_table(eval_runs, selected, best, edge, EXPORTED_EXACT_MATCH)
    labels = {a.key: a.label for a in arms}
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "arm", "lr", "seed", "steps", "exact_match_trained", "exact_match_exported",
                    "merge", "merge_relative_output_error", "wall_seconds"])
        for r in runs:
            w.writerow([r["phase"], r["arm"], r["lr"], r["seed"], r["steps"], r["accuracy_before_merge"],
                        r["accuracy_after_merge"], r["merge_error"]["method"],
                        r["merge_error"]["relative_output_error"], round(r["wall_seconds"], 1)])
    (out / "summary.json").write_text(json.dumps({"rows": rows, "best_lr": best}, indent=2, default=str))
    minutes = (time.perf_counter() - start) / 60
    md = (f"LLaMA example, tuned protocol ({'quick' if args.quick else 'full'}): {plan['steps']} steps, tuning seeds "
          f"{tune_seeds}, evaluation seeds {seeds}; {len(runs)} runs in {minutes:.1f} min (1 process).\n"
          "Metric: exact match of the exported plain-LoRA adapter; differences are arm minus LoRA on the same seed "
          "(positive: the arm's export is better).\n\n" + table
          + "\n\nTuning (exported exact match, mean of tuning seeds; best in bold):\n\n"
          + sweep_table(scores, labels, EXPORTED_EXACT_MATCH) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    return 0


# ------------------------------------------------------------------------------------- running
def run_one(task: str, arm: str, seed: int, plan: dict, out: Path, extra: list[str], bases: Path,
            flags_given: bool = False, slug: str = "") -> dict:
    """One offline example run in process; its stdout goes to a log file. Returns the example's summary.

    ``extra`` follows the arm's flags (``ARMS[arm]``), or replaces them with ``flags_given``.
    """
    slug = slug or f"{task}-{arm.replace('ResLoRA ', '').replace(' ', '').replace('=', '')}-seed{seed}"
    run_dir = out / "runs" / slug
    base_dir = bases / f"{task}-seed{seed}-pretrain{plan['pretrain']}"
    argv = ["--offline", "--seed", str(seed), "--max_train_steps", str(plan["steps"]),
            "--eval_steps", str(plan["eval_steps"]), "--offline_pretrain_steps", str(plan["pretrain"]),
            "--offline_base_dir", str(base_dir), "--output_dir", str(run_dir), "--no_progress_bar", *BENCH_ALPHA,
            *([] if flags_given else ARMS[arm]), *extra]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "logs" / f"{slug}.log", "w") as log, contextlib.redirect_stdout(log):
        print("argv:", " ".join(argv), flush=True)
        summary = TASKS[task]["demo"].train(argv)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["argv"] = argv
    return summary


# ------------------------------------------------------------------------------------- summary
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_curve(runs: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps evaluated by every run, and the mean, min and max metric over runs at each."""
    steps = sorted(set.intersection(*[{h["step"] for h in r["eval_history"]} for r in runs]))
    by_run = [{h["step"]: h["metric"] for h in r["eval_history"]} for r in runs]
    values = [[m[s] for m in by_run] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def first_reach(steps: list[int], values: list[float], target: float, eps: float = 1e-9):
    for s, v in zip(steps, values):
        if v >= target - eps:
            return s
    return None


def _fmt_ms(ms: tuple[float, float], d: int = 3) -> str:
    return f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"


def _fmt_paired(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):+.3f} [{min(xs):+.3f}, {max(xs):+.3f}]"


def summarize_task(task: str, runs_by_arm: dict[str, list[dict]]) -> tuple[str, dict]:
    metric = TASKS[task]["metric"]
    lora = runs_by_arm.get("LoRA")
    target = mean_std([r["accuracy_before_merge"] for r in lora])[0] if lora else None
    lora_by_seed = {r["seed"]: r for r in lora} if lora else {}
    rows, stats = [], {}
    for arm, runs in runs_by_arm.items():
        final_u = [r["accuracy_before_merge"] for r in runs]
        final_m = [r["accuracy_after_merge"] for r in runs]
        sps = [r["train_seconds"] / max(r["steps"], 1) for r in runs]
        steps, mean, _, _ = mean_curve(runs)
        reach_mean = first_reach(steps, mean, target) if target is not None else None
        reach_seed = [first_reach([h["step"] for h in r["eval_history"]], [h["metric"] for h in r["eval_history"]],
                                  target) for r in runs] if target is not None else []
        paired = [r["accuracy_before_merge"] - lora_by_seed[r["seed"]]["accuracy_before_merge"]
                  for r in runs if r["seed"] in lora_by_seed]
        paired_m = [r["accuracy_after_merge"] - lora_by_seed[r["seed"]]["accuracy_after_merge"]
                    for r in runs if r["seed"] in lora_by_seed]
        time_ratio = [s / (lora_by_seed[r["seed"]]["train_seconds"] / max(lora_by_seed[r["seed"]]["steps"], 1))
                      for r, s in zip(runs, sps) if r["seed"] in lora_by_seed]
        merge_err = [r["merge_error"]["relative_output_error"] for r in runs]
        st = dict(final_unmerged=mean_std(final_u), final_merged=mean_std(final_m), sec_per_step=mean_std(sps),
                  reach_mean_curve=reach_mean, reach_per_seed=reach_seed, paired_unmerged=paired,
                  paired_merged=paired_m, time_ratio=time_ratio, merge_error=mean_std(merge_err),
                  merge_method=runs[0]["merge_error"]["method"], n=len(runs))
        stats[arm] = st
        fmt_paired = _fmt_paired if arm != "LoRA" else (lambda xs: "–")
        reach = "not reached" if reach_mean is None else str(reach_mean)
        per_seed = ", ".join("nr" if s is None else str(s) for s in reach_seed)
        ratio = f" ({statistics.fmean(time_ratio):.2f}x)" if time_ratio and arm != "LoRA" else ""
        rows.append(f"| {arm} | {_fmt_ms(st['final_unmerged'])} | {fmt_paired(paired)} | {_fmt_ms(st['final_merged'])} "
                    f"| {fmt_paired(paired_m)} | {st['merge_method']}, {st['merge_error'][0]:.3f} | {reach} ({per_seed}) "
                    f"| {1000 * st['sec_per_step'][0]:.1f} ± {1000 * st['sec_per_step'][1]:.1f}{ratio} |")
    any_runs = next(iter(runs_by_arm.values()))
    n_seeds = len({r["seed"] for r in any_runs})
    base = statistics.fmean(r["accuracy_before_finetuning"] for r in any_runs)
    header = [
        f"### {task}: {TASKS[task]['title']}",
        "",
        f"{n_seeds} seed{'s' if n_seeds > 1 else ''} ({', '.join(str(r['seed']) for r in any_runs)}), "
        f"{any_runs[0]['steps']} steps, "
        f"metric: {metric} on the held-out set; before fine-tuning (step 0): {base:.3f} (mean over seeds). "
        f"LoRA's final unmerged mean, the target of the 'steps to reach' column: "
        f"{'n/a' if target is None else f'{target:.3f}'}.",
        "",
        ("| arm | final unmerged (mean ± std) | Δ unmerged vs LoRA, paired mean [min, max] | final merged (mean ± std) "
         "| Δ merged vs LoRA, paired mean [min, max] | merge, rel. output error | steps to reach LoRA's final "
         "mean: mean curve (per seed) | ms per step (mean ± std; vs LoRA) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n", stats


# -------------------------------------------------------------------------------------- plots
def paired_curve(runs: list[dict], lora: list[dict]):
    """Per seed, the arm's metric minus LoRA's at the same step; mean, min and max over seeds."""
    lora_by_seed = {r["seed"]: {h["step"]: h["metric"] for h in r["eval_history"]} for r in lora}
    diffs = []
    for r in runs:
        if r["seed"] in lora_by_seed:
            ref = lora_by_seed[r["seed"]]
            diffs.append({h["step"]: h["metric"] - ref[h["step"]] for h in r["eval_history"] if h["step"] in ref})
    if not diffs:
        return None
    steps = sorted(set.intersection(*[set(d) for d in diffs]))
    values = [[d[s] for d in diffs] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_task(task: str, runs_by_arm: dict[str, list[dict]], out: Path, backend: str = "auto") -> tuple[list[Path], str]:
    """Two charts: the metric vs step (``<task>_convergence.png``) and the paired difference to LoRA
    (``<task>_vs_lora.png``, when LoRA is among the arms)."""
    metric = TASKS[task]["metric"]
    n = len(next(iter(runs_by_arm.values())))
    series = []
    for arm, runs in runs_by_arm.items():
        steps, mean, lo, hi = mean_curve(runs)
        merged = statistics.fmean(r["accuracy_after_merge"] for r in runs)
        series.append(dict(label=arm, steps=steps, mean=mean, lo=lo, hi=hi, merged=merged,
                           color=COLORS.get(arm, "#777777")))
    charts = [(out / f"{task}_convergence.png", series,
               f"{task}: unmerged {metric} vs step (mean, band = min-max over {n} seeds)",
               f"held-out {metric}", (-0.02, 1.02), True)]
    lora = runs_by_arm.get("LoRA")
    if lora:
        delta = []
        for arm, runs in runs_by_arm.items():
            curve = paired_curve(runs, lora) if arm != "LoRA" else None
            if curve:
                lora_m = {r["seed"]: r["accuracy_after_merge"] for r in lora}
                merged = statistics.fmean(r["accuracy_after_merge"] - lora_m[r["seed"]] for r in runs if r["seed"] in lora_m)
                delta.append(dict(label=arm, steps=curve[0], mean=curve[1], lo=curve[2], hi=curve[3], merged=merged,
                                  color=COLORS.get(arm, "#777777")))
        if delta:
            span = max(0.05, max(max(abs(v) for v in s["lo"] + s["hi"] + [s["merged"]]) for s in delta)) * 1.08
            charts.append((out / f"{task}_vs_lora.png", delta,
                           f"{task}: {metric} minus LoRA's, paired by seed (mean, band = min-max over {n} seeds)",
                           f"{metric} - LoRA's {metric}", (-span, span), False))
    used = ""
    for path, ser, title, ylabel, ylim, _ in charts:
        used = _plot(ser, path, title, "optimizer step", ylabel, ylim, backend)
    return [c[0] for c in charts], used


def _plot(series: list[dict], path: Path, title: str, xlabel: str, ylabel: str, ylim: tuple, backend: str) -> str:
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
            last = max(s["steps"][-1] for s in series)
            for i, s in enumerate(series):
                ax.plot(s["steps"], s["mean"], color=s["color"], label=s["label"], lw=1.8)
                ax.fill_between(s["steps"], s["lo"], s["hi"], color=s["color"], alpha=0.13, lw=0)
                ax.plot([last * (1.02 + 0.012 * i)], [s["merged"]], marker="x", ms=8, mew=2, color=s["color"], ls="none")
            ax.plot([], [], marker="x", color="#777777", ls="none", label="after merge (mean), at the last step")
            if ylim[0] < 0 < ylim[1]:
                ax.axhline(0.0, color="black", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return "matplotlib"
    _plot_pil(series, path, title, xlabel, ylabel, ylim)
    return "pil"


def _plot_pil(series: list[dict], path: Path, title: str, xlabel: str, ylabel: str, ylim: tuple = (-0.02, 1.02)):
    """A plain line chart with bands, axes, ticks and a legend, drawn with PIL (no matplotlib needed)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, B = 880, 560, 70, 30, 40, 60
    img = Image.new("RGBA", (W, H), "white")
    font = ImageFont.load_default()
    last = max(s["steps"][-1] for s in series)
    xmax = last * 1.06

    def X(step):
        return L + (W - L - R) * step / xmax

    def Y(v):
        return T + (H - T - B) * (ylim[1] - v) / (ylim[1] - ylim[0])

    def rgb(hexcolor):
        return tuple(int(hexcolor[i:i + 2], 16) for i in (1, 3, 5))

    band = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    bd = ImageDraw.Draw(band)
    for s in series:
        poly = [(X(x), Y(v)) for x, v in zip(s["steps"], s["hi"])] + \
               [(X(x), Y(v)) for x, v in reversed(list(zip(s["steps"], s["lo"])))]
        bd.polygon(poly, fill=rgb(s["color"]) + (34,))
    img = Image.alpha_composite(img, band)
    d = ImageDraw.Draw(img)
    lo_tick, hi_tick = math.ceil(ylim[0] * 10) / 10, math.floor(ylim[1] * 10) / 10
    step_tick = 0.2 if hi_tick - lo_tick > 0.6 else (0.1 if hi_tick - lo_tick > 0.25 else 0.05)
    v = math.ceil(ylim[0] / step_tick) * step_tick
    while v <= ylim[1] + 1e-9:  # y grid and ticks
        d.line([(L, Y(v)), (W - R, Y(v))], fill=(140, 140, 140) if abs(v) < 1e-9 else (225, 225, 225))
        d.text((L - 40, Y(v) - 6), f"{v:+.2f}" if ylim[0] < 0 else f"{v:.1f}", fill="black", font=font)
        v += step_tick
    tick = max(1, round(last / 6 / 10) * 10) if last >= 60 else max(1, last // 6)
    for x in range(0, last + 1, tick):
        d.line([(X(x), H - B), (X(x), H - B + 5)], fill="black")
        d.text((X(x) - 8, H - B + 8), str(x), fill="black", font=font)
    d.line([(L, T), (L, H - B), (W - R, H - B)], fill="black")
    for i, s in enumerate(series):
        c = rgb(s["color"])
        d.line([(X(x), Y(v)) for x, v in zip(s["steps"], s["mean"])], fill=c, width=2)
        mx, my = X(last * (1.02 + 0.012 * i)), Y(s["merged"])
        d.line([(mx - 5, my - 5), (mx + 5, my + 5)], fill=c, width=2)
        d.line([(mx - 5, my + 5), (mx + 5, my - 5)], fill=c, width=2)
        ly = H - B - 20 - 16 * (len(series) - i)
        d.line([(W - R - 250, ly + 6), (W - R - 225, ly + 6)], fill=c, width=3)
        d.text((W - R - 218, ly), s["label"], fill="black", font=font)
    d.text((W - R - 250, H - B - 20), "x = after merge (mean), at the last step", fill="black", font=font)
    d.text((L, 6), title, fill="black", font=font)
    d.text(((W - L) // 2, H - 22), xlabel, fill="black", font=font)
    d.text((6, T - 18), ylabel, fill="black", font=font)
    img.convert("RGB").save(path)


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["roberta", "llama", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch, shorter base pretraining (<= 5 min)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0..4 (quick: 0 1)")
    ap.add_argument("--arms", nargs="+", choices=list(ARM_ALIASES) + list(ARMS), default=list(ARMS),
                    help="arms to run, by short name (lora is bs1 ms1) or full name (default: all four)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run, every task (default per task)")
    ap.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default per task)")
    ap.add_argument("--merge", default="bi", help="the examples' --merge (default: bi, as in the earlier results)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--plot_backend", choices=["auto", "matplotlib", "pil"], default="auto")
    ap.add_argument("--bases", type=Path, default=None,
                    help="cache of the pretrained offline bases, one per task and seed (default: <out>/bases); "
                         "point it at an earlier run's to skip pretraining")
    ap.add_argument("--from_json", type=Path, default=None,
                    help="redo the tables and plots from an earlier run's results.json (no training)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/transformers (quick: benchmarks/results/transformers_quick)")
    ap.add_argument("--tuned", action="store_true", help="LLaMA: exported adapter vs a tuned LoRA (see above)")
    ap.add_argument("--tune_seeds", type=int, nargs="+", default=None, help="--tuned: the seeds that choose LRs")
    ap.add_argument("--tuned_arms", nargs="+", choices=list(TUNED_ARMS), default=None, help="--tuned: arms")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="--tuned: the starting learning-rate grid")
    ap.add_argument("--max_extend", type=int, default=None, help="--tuned: grid extensions per side at an edge")
    args = ap.parse_args(argv)
    args.arms = list(dict.fromkeys(ARM_ALIASES.get(a, a) for a in args.arms))

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)  # the examples' basicConfig(INFO) then does nothing
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass

    if args.tuned:
        return run_tuned(args)
    mode = QUICK if args.quick else FULL
    seeds = args.seeds or mode["seeds"]
    tasks = ["roberta", "llama"] if args.task == "both" else [args.task]
    out = args.out or ROOT / "benchmarks" / "results" / ("transformers_quick" if args.quick else "transformers")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():  # the weights of bases and runs and the raw logs stay out of git
        (out / ".gitignore").write_text("bases/\nruns/\nlogs/\n")
    extra = ["--merge", args.merge]
    t_all = time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    results: dict[str, dict[str, list[dict]]] = {}
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        results = {t: runs for t, runs in earlier["runs"].items() if t in tasks}
        tasks = []
    for task in tasks:
        plan = dict(mode[task])
        if args.steps:
            plan["steps"] = args.steps
        if args.eval_steps:
            plan["eval_steps"] = args.eval_steps
        results[task] = {arm: [] for arm in args.arms}
        n_runs, i = len(seeds) * len(args.arms), 0
        for k, seed in enumerate(seeds):
            order = args.arms[k % len(args.arms):] + args.arms[: k % len(args.arms)]
            for arm in order:
                i += 1
                s = run_one(task, arm, seed, plan, out, extra, args.bases or out / "bases")
                s["seed"], s["arm"], s["task_name"] = seed, arm, task
                results[task][arm].append(s)
                print(f"[{time.perf_counter() - t_all:7.1f}s] {task} {i}/{n_runs} {arm:15s} seed {seed}: "
                      f"unmerged {s['accuracy_before_merge']:.3f} merged {s['accuracy_after_merge']:.3f} "
                      f"({1000 * s['train_seconds'] / max(s['steps'], 1):.1f} ms/step, run {s['wall_seconds']:.1f}s)",
                      file=sys.stderr, flush=True)
        for arm in args.arms:
            results[task][arm].sort(key=lambda r: r["seed"])

    # ---- files
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "arm", "seed", "step", "metric", "view"])
        for task, by_arm in results.items():
            for arm, runs in by_arm.items():
                for r in runs:
                    for h in r["eval_history"]:
                        w.writerow([task, arm, r["seed"], h["step"], f"{h['metric']:.6f}", "unmerged"])
                    w.writerow([task, arm, r["seed"], r["steps"], f"{r['accuracy_after_merge']:.6f}", "merged"])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "arm", "seed", "steps", "metric_before_finetuning", "final_unmerged", "final_merged",
                    "merge", "merge_relative_output_error", "train_seconds", "ms_per_step", "wall_seconds"])
        for task, by_arm in results.items():
            for arm, runs in by_arm.items():
                for r in runs:
                    w.writerow([task, arm, r["seed"], r["steps"], f"{r['accuracy_before_finetuning']:.6f}",
                                f"{r['accuracy_before_merge']:.6f}", f"{r['accuracy_after_merge']:.6f}",
                                r["merge_error"]["method"], f"{r['merge_error']['relative_output_error']:.6g}",
                                f"{r['train_seconds']:.3f}", f"{1000 * r['train_seconds'] / max(r['steps'], 1):.2f}",
                                f"{r['wall_seconds']:.2f}"])

    total = time.perf_counter() - t_all
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = shlex.join(["python", "-m", "benchmarks.transformers_convergence",
                          *(argv if argv is not None else sys.argv[1:])])
    if args.from_json:  # report the run that produced the numbers
        command, started, total = earlier["command"], earlier["started"], earlier["seconds"]
        load_start, load_end = earlier.get("load_start"), earlier.get("load_end")
        args.threads = earlier.get("threads", args.threads)
    mode_name = "quick" if args.quick else "full"
    if args.from_json:
        mode_name = earlier.get("mode", "quick" if "--quick" in command.split() else "full")
    md = [f"## LoRA vs ResLoRA on the offline transformers examples ({mode_name} mode)", "",
          f"Command: `OMP_NUM_THREADS=1 {command.strip()}`; started {started}, {total / 60:.1f} min in all, "
          f"{args.threads} torch thread(s), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average at start / end: "
          f"{'n/a' if load_start is None else ' '.join(f'{x:.2f}' for x in load_start)} / "
          f"{'n/a' if load_end is None else ' '.join(f'{x:.2f}' for x in load_end)}.", ""]
    all_stats = {}
    for task, by_arm in results.items():
        table, stats = summarize_task(task, by_arm)
        all_stats[task] = stats
        pngs, used = plot_task(task, by_arm, out, args.plot_backend)
        md += [table] + [f"![{p.stem}]({p.name})" for p in pngs] + [f"(plots drawn with {used})", ""]
    md += ["'Δ … paired': per seed, the arm's metric minus LoRA's at the same seed (same base, data, order); "
           "mean [min, max] over seeds. 'nr' = not reached. ms per step: the training loop without evaluations, "
           "runs sequential on a shared machine; '(1.05x)' is the mean over seeds of the per-seed ratio to LoRA.", ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    with open(out / "results.json", "w") as f:
        json.dump({"mode": mode_name, "command": command, "started": started, "seconds": total, "seeds": seeds,
                   "load_start": load_start, "load_end": load_end, "threads": args.threads,
                   "stats": all_stats, "runs": results}, f, indent=1, default=str)
    print(text)
    return results


if __name__ == "__main__":
    main()
