#!/usr/bin/env python
"""Does ResLoRA learn faster than LoRA? Convergence on the embedded tiny SD2 base + pokemon-style.

    python benchmarks/convergence.py            # full: 8 arms, LR sweep, 3 seeds (<= 60 min on 2 cores)
    python benchmarks/convergence.py --quick    # 4 arms, LR sweep, 2 seeds, fewer steps (<= 10 min)

Arms: plain peft LoRA, ResLoRA ``is``, and ``bs``/``ms`` with pre_num 1, 4 and -1, all with rank 4 on
``to_q/to_k/to_v/to_out.0``, batch 8, the same LoRA init, data order and noise for a seed.

Protocol: every arm trains with seed 0 at each learning rate of the sweep; its best learning rate
(lowest final held-out loss of the model as trained) is then trained with the other seeds. Every
``--eval_every`` steps it records the training loss (mean since the last record) and the held-out
denoising loss (fixed image, noise and timestep triples); every ``--sample_every`` steps the style
score of samples from fixed prompts and seeds, drawn through the merged view (for ResLoRA ``is``/
``ms`` the ``ls`` merge, i.e. what the exported LoRA gives). At the end, the held-out loss of the
merged model too.

Writes to ``--out``: ``curves.csv``, ``runs.csv``, ``results.md`` (also printed), plots
(``held_out_loss.png``, ``style_score.png``, ``train_loss.png``, ``lr_sweep.png``), and
``comparison_grid.png`` (LoRA vs the best ResLoRA arm, seed 0, same prompts). Each run's samples and
ResLoRA training state are kept under ``runs/`` (``merge_fidelity.py`` reads them).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sd_bench as bench  # noqa: E402

QUICK = dict(arms=["lora", "is", "bs1", "ms1"], seeds=[0, 1], steps=100, eval_every=10, sample_every=50)
FULL = dict(arms=list(bench.ARMS), seeds=[0, 1, 2], steps=200, eval_every=20, sample_every=100)

_CTX = None


def _init_worker(threads: int):
    global _CTX
    _CTX = bench.BenchContext(threads=threads)


def _work(task: dict) -> dict:
    arm = bench.ARMS[task["arm"]]
    t0 = time.time()
    result = bench.train_run(_CTX, arm, task["lr"], task["seed"], task["steps"], batch_size=task["batch_size"],
                             eval_every=task["eval_every"], sample_every=task["sample_every"], rank=task["rank"],
                             run_dir=Path(task["run_dir"]), sample_inference_steps=task["sample_inference_steps"])
    result["wall_seconds"] = time.time() - t0
    return result


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}_lr{lr:g}_seed{seed}"


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
def mean_std(xs) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(m, s, digits=4) -> str:
    return "n/a" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def steps_to_reach(curve: list[dict], threshold: float):
    for row in curve:
        if row["step"] > 0 and row["held_out_loss"] <= threshold:
            return row["step"]
    return None


def summarize(selected: dict[str, list[dict]], best_lr: dict[str, float], sweep: dict) -> tuple[list[dict], str]:
    lora_final = mean_std([r["final"]["held_out_loss"] for r in selected["lora"]])[0] if "lora" in selected else None
    lora_time = np.mean([r["final"]["train_seconds_per_step"] for r in selected["lora"]]) if "lora" in selected else None
    rows = []
    for key, runs in selected.items():
        arm = bench.ARMS[key]
        reach = [steps_to_reach(r["curve"], lora_final) for r in runs] if lora_final is not None else []
        reached = [s for s in reach if s is not None]
        styles = [r["curve"][-1]["style_score"] for r in runs]
        sec = float(np.mean([r["final"]["train_seconds_per_step"] for r in runs]))
        rows.append({
            "arm": key, "label": arm.label, "best_lr": best_lr[key], "seeds": len(runs),
            "held_out": mean_std([r["final"]["held_out_loss"] for r in runs]),
            "held_out_merged": mean_std([r["final"].get("held_out_loss_merged") for r in runs]),
            "merge_error": mean_std([r["final"].get("merge_relative_error") for r in runs]),
            "style": mean_std(styles),
            "reach_mean": float(np.mean(reached)) if reached else None, "reached": len(reached),
            "sec_per_step": sec, "time_ratio": sec / lora_time if lora_time else None,
            "sweep": {lr: r["final"]["held_out_loss"] for lr, r in sweep[key].items()},
        })
    lines = [
        "| arm | best LR | final held-out loss | merged held-out loss | steps to LoRA's final held-out loss | "
        "final style score | merge error | s/step (× LoRA) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "not reached" if r["reach_mean"] is None else f"{r['reach_mean']:.0f} ({r['reached']}/{r['seeds']} seeds)"
        ratio = f" ({r['time_ratio']:.2f}×)" if r["time_ratio"] else ""
        lines.append(
            f"| {r['label']} | {r['best_lr']:g} | {fmt(*r['held_out'])} | {fmt(*r['held_out_merged'])} | {reach} | "
            f"{fmt(*r['style'], digits=3)} | {fmt(*r['merge_error'], digits=3)} | {r['sec_per_step']:.3f}{ratio} |"
        )
    lines += ["", "LR sweep (seed 0, final held-out loss of the model as trained):", "",
              "| arm | " + " | ".join(f"lr {lr:g}" for lr in sorted(rows[0]["sweep"])) + " |",
              "|---|" + "---|" * len(rows[0]["sweep"])]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['sweep'][lr]:.4f}" for lr in sorted(r["sweep"])) + " |")
    return rows, "\n".join(lines)


def plot_curves(selected: dict[str, list[dict]], metric: str, ylabel: str, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for key, runs in selected.items():
        steps = [row["step"] for row in runs[0]["curve"] if row.get(metric) is not None]
        if not steps:
            continue
        values = np.array([[next(row[metric] for row in r["curve"] if row["step"] == s) for s in steps] for r in runs],
                          dtype=float)
        mean = np.nanmean(values, axis=0)
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{bench.ARMS[key].label} (n={len(runs)})",
                        ls="-" if key == "lora" else "--", lw=2.2 if key == "lora" else 1.3)
        ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(sweep: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, by_lr in sweep.items():
        lrs = sorted(by_lr)
        ax.plot(lrs, [by_lr[lr]["final"]["held_out_loss"] for lr in lrs], marker="o", label=bench.ARMS[key].label,
                lw=2.2 if key == "lora" else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final held-out loss (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_csvs(out: Path, results: list[dict], selected_names: set):
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "label", "lr", "seed", "step", "train_loss", "held_out_loss", "style_score"])
        for r in results:
            for row in r["curve"]:
                w.writerow([r["arm"], bench.ARMS[r["arm"]].label, r["lr"], r["seed"], row["step"],
                            row["train_loss"], row["held_out_loss"], row["style_score"]])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "label", "lr", "seed", "selected", "final_held_out_loss", "final_held_out_loss_merged",
                    "merge_relative_error", "final_style_score", "train_seconds_per_step", "wall_seconds"])
        for r in results:
            fin = r["final"]
            w.writerow([r["arm"], bench.ARMS[r["arm"]].label, r["lr"], r["seed"],
                        run_name(r["arm"], r["lr"], r["seed"]) in selected_names, fin["held_out_loss"],
                        fin.get("held_out_loss_merged"), fin.get("merge_relative_error"), r["curve"][-1]["style_score"],
                        fin["train_seconds_per_step"], round(r["wall_seconds"], 1)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 arms, 2 seeds, 100 steps (<= 10 min on 2 cores)")
    ap.add_argument("--arms", nargs="+", default=None, help=f"arms (default: all; quick: {QUICK['arms']})")
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3], help="learning-rate sweep")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds; the first one runs the sweep")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--eval_every", type=int, default=None)
    ap.add_argument("--sample_every", type=int, default=None)
    ap.add_argument("--sample_inference_steps", type=int, default=20, help="DDIM steps per sample")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one torch thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/sd_convergence[_quick]")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("arms", "seeds", "steps", "eval_every", "sample_every"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    arms = bench.parse_arms(args.arms)
    if "lora" not in args.arms:
        raise SystemExit("--arms must include lora (the reference).")
    if args.sample_every and (args.steps % args.sample_every or args.sample_every % args.eval_every):
        raise SystemExit("--sample_every must divide --steps (the final step is sampled) and be a multiple of "
                         "--eval_every (samples are drawn at evaluations).")
    out = args.out or bench.ROOT / "benchmarks" / "results" / ("sd_convergence_quick" if args.quick else "sd_convergence")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    start = time.time()

    def task(arm, lr, seed):
        return dict(arm=arm.key, lr=lr, seed=seed, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                    eval_every=args.eval_every, sample_every=args.sample_every,
                    sample_inference_steps=args.sample_inference_steps,
                    run_dir=str(out / "runs" / run_name(arm.key, lr, seed)))

    def log(r, i, n):
        fin = r["final"]
        print(f"[{time.time() - start:6.0f}s] {i}/{n} {run_name(r['arm'], r['lr'], r['seed'])}: held-out "
              f"{fin['held_out_loss']:.4f} (merged {fin.get('held_out_loss_merged', float('nan')):.4f}), style "
              f"{r['curve'][-1]['style_score']}, {fin['train_seconds_per_step']:.3f} s/step", flush=True)

    first, rest = args.seeds[0], args.seeds[1:]
    print(f"sweep: {len(arms)} arms x {len(args.lrs)} LRs, seed {first}, {args.steps} steps", flush=True)
    sweep_results = run_tasks([task(a, lr, first) for a in arms for lr in args.lrs], args.jobs, args.threads, log)
    sweep = {a.key: {} for a in arms}
    for r in sweep_results:
        sweep[r["arm"]][r["lr"]] = r

    def final_loss(r):
        v = r["final"]["held_out_loss"]
        return v if math.isfinite(v) else float("inf")

    best_lr = {key: min(by_lr.values(), key=final_loss)["lr"] for key, by_lr in sweep.items()}
    print("best learning rates:", json.dumps(best_lr), flush=True)
    seed_results = run_tasks([task(a, best_lr[a.key], s) for a in arms for s in rest], args.jobs, args.threads, log)

    selected = {a.key: [sweep[a.key][best_lr[a.key]]] + [r for r in seed_results if r["arm"] == a.key] for a in arms}
    selected_names = {run_name(r["arm"], r["lr"], r["seed"]) for runs in selected.values() for r in runs}
    all_results = sweep_results + seed_results
    write_csvs(out, all_results, selected_names)
    rows, table = summarize(selected, best_lr, sweep)
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str))

    n_seeds = len(args.seeds)
    plot_curves(selected, "held_out_loss", "held-out denoising loss (v-pred MSE)", out / "held_out_loss.png",
                f"held-out loss, best LR per arm, mean and min-max over {n_seeds} seeds")
    plot_curves(selected, "train_loss", "training loss (mean over interval)", out / "train_loss.png",
                f"training loss, best LR per arm, mean and min-max over {n_seeds} seeds")
    plot_curves(selected, "style_score", "style score of merged-model samples", out / "style_score.png",
                f"style score (6 samples), best LR per arm, mean and min-max over {n_seeds} seeds")
    plot_sweep(sweep, out / "lr_sweep.png")

    reslora = [r for r in rows if r["arm"] != "lora"]
    best = min(reslora, key=lambda r: r["held_out"][0] if math.isfinite(r["held_out"][0]) else float("inf"))
    sys.path.insert(0, str(bench.ROOT / "examples"))
    from generate_progress_grid import build_grid

    grid = build_grid([out / "runs" / run_name("lora", best_lr["lora"], first),
                       out / "runs" / run_name(best["arm"], best_lr[best["arm"]], first)],
                      ["LoRA", best["label"]], seed=0)
    grid.save(out / "comparison_grid.png")

    elapsed = time.time() - start
    header = (f"{'Quick' if args.quick else 'Full'} run: {len(arms)} arms, LRs {args.lrs}, seeds {args.seeds}, "
              f"{args.steps} steps of batch {args.batch_size}, rank {args.rank}; {len(all_results)} runs in "
              f"{elapsed / 60:.1f} min with {args.jobs} worker(s) x {args.threads} thread(s).\n"
              f"Held-out loss: v-prediction MSE on 64 fixed (image, noise, timestep) triples. Style score: 6 samples "
              f"(3 prompts x 2 seeds) of the merged model. Mean ± std over seeds at each arm's best LR.\n")
    md = header + "\n" + table + "\n"
    (out / "results.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
