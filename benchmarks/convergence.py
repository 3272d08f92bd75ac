#!/usr/bin/env python
"""Does the LoRA file that ResLoRA exports beat a tuned plain LoRA? Tiny SD2 base + pokemon-style.

    python -m benchmarks.convergence            # full: 10 arms, bracketed LR tuning, 5 evaluation seeds
    python -m benchmarks.convergence --quick    # 4 arms, 3 LRs, 1 tuning + 2 evaluation seeds (<= 10 min)

Arms (``--arms``): plain peft LoRA, ResLoRA ``is``, ``ms`` m=-1, ``bs`` m=-1, and ``is``/``ms`` m=-1 with
shortcut annealing (``shortcut_decay`` windows 0.5-0.9 and 0.3-0.8) and with merge-and-continue
(``merge_at`` 0.6). All rank 4 on ``to_q/to_k/to_v/to_out.0``, batch 8; for a seed every arm shares
the LoRA init, data order, noise and timesteps.

Primary metric: held-out denoising loss (v-prediction MSE on 64 fixed image/noise/timestep triples of
images not trained on) of the *exported plain LoRA* at the end: the model as trained for LoRA, ``bs``
and the annealed/merged arms (their export is exact), the ``ls`` merge for ``is``/``ms``.

Protocol, so that nothing is selected on the seeds that are reported:
1. Tuning: every arm at every learning rate of ``--lrs`` (a factor-sqrt(2) grid) on ``--tune_seeds``.
   An arm's best rate is the lowest mean export loss over the tuning seeds. While it is at an edge of
   the grid, the grid is extended by one sqrt(2) step on that side for that arm (``--max_extend``
   times); a best rate still at an edge is flagged in the table. The anneal window is chosen the same
   way: the windows of one structure form a family and the best (window, rate) is kept.
2. Evaluation: each selected arm at its rate on the fresh ``--eval_seeds``, with the export's curve
   over steps. LoRA also runs at its rate / sqrt(2) and x sqrt(2) on those seeds: "LoRA oracle" is
   LoRA's best of the three per seed, which no honest tuning can beat.
3. Per arm: the export loss minus LoRA's on the same seed, mean and standard error, and the number of
   seeds where the arm is better; the same against the oracle.

Writes to ``--out``: ``runs.csv`` (every run), ``curves.csv`` (evaluation runs), ``results.md`` (also
printed), ``summary.json``, ``export_curve.png`` (export loss over steps), ``lr_sweep.png`` (tuning), and
the evaluation runs' ResLoRA training states under ``runs/`` (``merge_fidelity.py`` reads them).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks import _sd_bench as bench
from benchmarks._tuning import (SQRT2, Metric, evaluation_triples, grid_step, paired_table, select_families, sweep_table,
                                tune)
from reslora_diffusers import MERGE_METHODS
from reslora_diffusers.integrations.cli import RESLORA_DEFAULTS

FULL = dict(arms=["lora", "is", "ms-1", "bs-1", "is-d59", "is-d38", "ms-1-d59", "ms-1-d38", "is-m6", "ms-1-m6"],
            lrs=[1e-2 / SQRT2, 1e-2, 1e-2 * SQRT2, 2e-2], tune_seeds=[100, 101], eval_seeds=[0, 1, 2, 3, 4],
            steps=100, eval_every=20, max_extend=2)
QUICK = dict(arms=["lora", "is", "is-d59", "ms-1-d59"], lrs=[1e-2 / SQRT2, 1e-2, 1e-2 * SQRT2],
             tune_seeds=[100], eval_seeds=[0, 1], steps=60, eval_every=20, max_extend=0)

_CTX = None


def _init_worker(threads: int):
    global _CTX
    _CTX = bench.BenchContext(threads=threads)


def _work(task: dict) -> dict:
    arm = bench.ARMS[task["arm"]]
    t0 = time.time()
    result = bench.train_run(_CTX, arm, task["lr"], task["seed"], task["steps"], batch_size=task["batch_size"],
                             eval_every=task["eval_every"], rank=task["rank"], merge=task["merge"],
                             export_curve=task["export_curve"],
                             run_dir=Path(task["run_dir"]) if task.get("run_dir") else None)
    result["wall_seconds"] = time.time() - t0
    result["phase"] = task["phase"]
    return result


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}_lr{lr:.4g}_seed{seed}"


def run_tasks(tasks: list[dict], jobs: int, threads: int, log) -> list[dict]:
    results = []
    if jobs <= 1:
        _init_worker(threads)
        for i, t in enumerate(tasks):
            results.append(_work(t))
            log(results[-1], i + 1, len(tasks))
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        for i, r in enumerate(pool.map(_work, tasks)):
            results.append(r)
            log(r, i + 1, len(tasks))
    return results


# ----------------------------------------------------------------------------------- reporting
EXPORT = Metric(
    "exported LoRA held-out loss",
    value=lambda r: r["final"].get("held_out_loss_merged", float("nan")),
    trained=lambda r: r["final"]["held_out_loss"],
    merge_error=lambda r: r["final"].get("merge_relative_error", 0.0),
)


def plot_export_curves(eval_runs, selected, best, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for a in selected:
        runs = [r for r in eval_runs if r["arm"] == a.key and r["lr"] == best[a.key]]
        steps = [row["step"] for row in runs[0]["curve"] if row["step"] > 0]
        values = np.array([[row["held_out_loss_export"] for row in r["curve"] if row["step"] > 0] for r in runs])
        mean = values.mean(axis=0)
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{a.label} (lr {best[a.key]:.3g})",
                        ls="-" if a.key == "lora" else "--", lw=2.2 if a.key == "lora" else 1.3)
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss of the exported plain LoRA")
    ax.set_title(f"export at each step, mean and min-max over {len(runs)} evaluation seeds", fontsize=10)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(losses: dict, labels: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for key, by_lr in losses.items():
        lrs = sorted(by_lr)
        ax.plot(lrs, [by_lr[lr] for lr in lrs], marker="o", label=labels[key], lw=2.2 if key == "lora" else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("export held-out loss (mean of tuning seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_csvs(out: Path, results: list[dict]):
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "arm", "label", "lr", "seed", "held_out_loss_trained", "held_out_loss_export",
                    "merge_relative_error", "train_seconds_per_step", "wall_seconds"])
        for r in results:
            fin = r["final"]
            w.writerow([r["phase"], r["arm"], bench.ARMS[r["arm"]].label, r["lr"], r["seed"], fin["held_out_loss"],
                        fin.get("held_out_loss_merged"), fin.get("merge_relative_error"),
                        fin["train_seconds_per_step"], round(r["wall_seconds"], 1)])
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "lr", "seed", "step", "train_loss", "held_out_loss_trained", "held_out_loss_export"])
        for r in results:
            if r["phase"] == "eval":
                for row in r["curve"]:
                    w.writerow([r["arm"], r["lr"], r["seed"], row["step"], row["train_loss"], row["held_out_loss"],
                                row.get("held_out_loss_export")])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 arms, 3 LRs, 1 tuning + 2 evaluation seeds, 60 steps")
    ap.add_argument("--arms", nargs="+", default=None, help=f"arms (default {FULL['arms']}; all: {list(bench.ARMS)})")
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="starting learning-rate grid")
    ap.add_argument("--tune_seeds", nargs="+", type=int, default=None)
    ap.add_argument("--eval_seeds", nargs="+", type=int, default=None)
    ap.add_argument("--max_extend", type=int, default=None, help="grid extensions per side while a best LR is at an edge")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval_every", type=int, default=None)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=RESLORA_DEFAULTS["rank"], help="LoRA rank (alpha = rank, as the script)")
    ap.add_argument("--merge", default=RESLORA_DEFAULTS["merge"], choices=MERGE_METHODS,
                    help="merge of the is/ms arms (as the training script's --merge)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/sd_convergence[_quick]")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("arms", "lrs", "tune_seeds", "eval_seeds", "max_extend", "steps", "eval_every"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    arms = bench.parse_arms(args.arms)
    if "lora" not in args.arms:
        raise SystemExit("--arms must include lora (the reference).")
    if set(args.tune_seeds) & set(args.eval_seeds):
        raise SystemExit("--tune_seeds and --eval_seeds must differ: nothing is selected on the reported seeds.")
    out = args.out or bench.ROOT / "benchmarks" / "results" / ("sd_convergence_quick" if args.quick else "sd_convergence")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    all_results = []

    def log(r, i, n):
        fin = r["final"]
        print(f"[{time.time() - start:6.0f}s] {r['phase']} {i}/{n} {run_name(r['arm'], r['lr'], r['seed'])}: "
              f"trained {fin['held_out_loss']:.4f}, export {fin.get('held_out_loss_merged', float('nan')):.4f}, "
              f"{fin['train_seconds_per_step']:.3f} s/step", flush=True)

    def run(triples, phase="tune"):
        tasks = [dict(arm=a.key, lr=lr, seed=s, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                      merge=args.merge, eval_every=args.eval_every, export_curve=phase == "eval", phase=phase,
                      run_dir=str(out / "runs" / run_name(a.key, lr, s)) if phase == "eval" else None)
                 for a, lr, s in triples]
        results = run_tasks(tasks, args.jobs, args.threads, log)
        all_results.extend(results)
        return results

    print(f"tuning: {len(arms)} arms x {len(args.lrs)} LRs x seeds {args.tune_seeds}, {args.steps} steps", flush=True)
    losses, best, edge = tune(arms, args.lrs, args.tune_seeds, run, EXPORT, args.max_extend)
    selected = select_families(arms, losses, best)
    print("selected:", json.dumps({a.key: best[a.key] for a in selected}), flush=True)
    lora_lrs = [grid_step(best["lora"], k) for k in (-1, 0, 1)]
    eval_runs = run(evaluation_triples(selected, best, args.eval_seeds, bench.ARMS["lora"]), phase="eval")

    labels = {a.key: a.label for a in arms}
    rows, table = paired_table(eval_runs, selected, best, edge, EXPORT)
    write_csvs(out, all_results)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "tuning": {k: {str(lr): v for lr, v in by.items()}
                                                                           for k, by in losses.items()}},
                                                 indent=2, default=str))
    plot_export_curves(eval_runs, selected, best, out / "export_curve.png")
    plot_sweep(losses, labels, out / "lr_sweep.png")

    elapsed = time.time() - start
    header = (f"{'Quick' if args.quick else 'Full'} run: {len(arms)} arms, {args.steps} steps of batch {args.batch_size}, "
              f"rank {args.rank}; tuning seeds {args.tune_seeds}, evaluation seeds {args.eval_seeds}; "
              f"{len(all_results)} runs in {elapsed / 60:.1f} min with {args.jobs} worker(s) x {args.threads} "
              f"thread(s).\nExport loss: held-out v-prediction MSE of the exported plain LoRA. LoRA oracle: LoRA's best "
              f"of LR {', '.join(f'{lr:.4g}' for lr in lora_lrs)} per evaluation seed. Differences are arm minus LoRA "
              "on the same seed (negative: the arm's export is better).\n")
    md = (header + "\n" + table + "\n\nTuning (export loss, mean of tuning seeds; best in bold):\n\n"
          + sweep_table(losses, labels, EXPORT) + "\n")
    (out / "results.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
