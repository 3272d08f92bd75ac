#!/usr/bin/env python
"""How much does merging a trained ResLoRA model into plain LoRA cost? Per merge method, on trained runs.

    python -m benchmarks.convergence                 # trains the runs (or --quick)
    python -m benchmarks.merge_fidelity              # reads benchmarks/results/sd_convergence
    python -m benchmarks.merge_fidelity --runs DIR [DIR ...]   # any folders with a ResLoRA training state

For each run (default: the ``is``, ``ms`` m=-1 and ``bs`` m=-1 arms of the convergence benchmark at
their tuned learning rate, every evaluation seed) it loads the unmerged training state into the tiny base and compares, for each merge
(``no``, ``bi``, ``bw``, ``ls``; ``bs`` is exact whatever the method):

- the held-out denoising loss of the merged model (same 64 fixed triples as convergence.py);
- the relative UNet output error of the merged model against the unmerged one on those inputs;
- the style score of samples (3 prompts x 2 seeds) from the merged model.

The unmerged model's loss and style score are the first row. Writes ``merge_fidelity.csv`` and
``merge_fidelity.md`` (also printed) next to the runs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import _sd_bench as bench
from reslora_diffusers import merge_reslora, merged_view
from reslora_diffusers.core.export import STATE_CONFIG_NAME, load_training_state, read_training_state_config
from reslora_diffusers.integrations.sd_run import unet_forward

METHODS = ("no", "bi", "bw", "ls")


def default_runs(results: Path, arms: list[str]) -> list[Path]:
    summary = results / "summary.json"
    if not summary.exists():
        raise SystemExit(f"{summary} not found: run benchmarks/convergence.py first (or pass --runs).")
    runs = []
    for row in json.loads(summary.read_text())["rows"]:
        if row["arm"] not in arms:
            continue
        lr = float(row["lr"])
        runs += sorted(d for d in (results / "runs").glob(f"{row['arm']}_lr{lr:.4g}_seed*") if (d / STATE_CONFIG_NAME).exists())
    if not runs:
        raise SystemExit(f"No ResLoRA training states under {results / 'runs'}.")
    return runs


def evaluate_run(ctx: bench.BenchContext, run: Path, sample_steps: int = 20) -> list[dict]:
    meta = read_training_state_config(str(run))
    unet = copy.deepcopy(ctx.base_unet)
    load_training_state(unet, str(run))
    unet.eval()
    config = meta["config"]
    label = bench.Arm("", config["structure"], config["pre_num"]).label
    seed = meta.get("extra", {}).get("seed")
    rows = [{"run": run.name, "arm": label, "seed": seed, "merge": "unmerged", "held_out_loss": ctx.held_out_loss(unet),
             "relative_output_error": 0.0, "relative_adapter_error": 0.0, "style_score": bench.style_of(ctx.samples(unet, sample_steps))}]
    methods = METHODS if config["structure"] in ("is", "ms") else ("exact",)
    for method in methods:
        result = merge_reslora(unet, method="no" if method == "exact" else method,
                               calibration_batches=ctx.calibration if method == "ls" else None, forward_fn=unet_forward)
        err = ctx.merge_error(unet, result)
        with merged_view(unet, result):
            loss = ctx.held_out_loss(unet)
            style = bench.style_of(ctx.samples(unet, sample_steps))
        rows.append({"run": run.name, "arm": label, "seed": seed, "merge": method, "held_out_loss": loss,
                     "relative_output_error": err["relative_output_error"],
                     "relative_adapter_error": err["relative_adapter_error"], "style_score": style})
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["merge"]), []).append(r)

    def ms(key, vals, digits):
        vals = [v[key] for v in vals]
        s = np.std(vals, ddof=1) if len(vals) > 1 else 0.0
        return f"{np.mean(vals):.{digits}f} ± {s:.{digits}f}"

    lines = ["| arm | merge | runs | held-out loss | relative output error | error / adapter effect | style score |",
             "|---|---|---|---|---|---|---|"]
    for (arm, merge), vals in groups.items():
        err = ms("relative_output_error", vals, 4) if merge != "exact" else \
            f"{max(v['relative_output_error'] for v in vals):.1e} (max)"
        lines.append(f"| {arm} | {merge} | {len(vals)} | {ms('held_out_loss', vals, 4)} | {err} | "
                     f"{ms('relative_adapter_error', vals, 3)} | {ms('style_score', vals, 3)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=bench.ROOT / "benchmarks" / "results" / "sd_convergence",
                    help="output folder of convergence.py (default: its full run)")
    ap.add_argument("--arms", nargs="+", default=["is", "ms-1", "bs-1"], help="arms of --results to evaluate")
    ap.add_argument("--runs", type=Path, nargs="+", default=None, help="explicit run folders instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample_inference_steps", type=int, default=20, help="DDIM steps per sample")
    ap.add_argument("--out", type=Path, default=None, help="default: --results")
    args = ap.parse_args(argv)
    runs = args.runs or default_runs(args.results, args.arms)
    out = args.out or (args.results if args.runs is None else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ctx = bench.BenchContext(threads=args.threads)
    rows = []
    for i, run in enumerate(runs):
        rows += evaluate_run(ctx, run, args.sample_inference_steps)
        print(f"[{time.time() - start:5.0f}s] {i + 1}/{len(runs)} {run.name}", flush=True)
    with open(out / "merge_fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    exact = [r["relative_output_error"] for r in rows if r["merge"] == "exact"]
    md = (f"Merge fidelity of {len(runs)} trained run(s), {time.time() - start:.0f} s. Held-out loss and errors on "
          "64 fixed held-out (image, noise, timestep) triples; style score of 6 samples. Mean ± std over runs.\n\n"
          + table(rows) + "\n")
    if exact:
        md += f"\n`bs` (exact merge): largest relative output error {max(exact):.1e}.\n"
    bad = [r for r in rows if r["merge"] == "exact" and not r["relative_output_error"] < 1e-4]
    (out / "merge_fidelity.md").write_text(md)
    print("\n" + md)
    if bad or any(not math.isfinite(r["held_out_loss"]) for r in rows):
        print("WARNING: a bs merge was not exact, or a loss is not finite.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
