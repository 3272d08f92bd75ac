"""The convergence and merge-fidelity benchmarks run end to end (a few steps; the real runs are in docs/)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_arms_share_init_and_data():
    import _sd_bench as bench

    ctx = bench.BenchContext(num_train=16, num_held_out=32)
    lora = ctx.fresh_unet(bench.ARMS["lora"], seed=3)
    ms = ctx.fresh_unet(bench.ARMS["ms4"], seed=3)
    a_lora = {n: p for n, p in lora.named_parameters() if "lora_A" in n}
    a_ms = dict(ms.named_parameters())
    assert a_lora and all(torch.equal(p, a_ms[n]) for n, p in a_lora.items())  # same LoRA init for a seed
    (x1, t1, h1), v1 = ctx.batch(seed=3, step=5, batch_size=4)
    (x2, t2, h2), v2 = ctx.batch(seed=3, step=5, batch_size=4)
    (x3, _, _), _ = ctx.batch(seed=4, step=5, batch_size=4)
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(v1, v2) and not torch.equal(x1, x3)


def test_convergence_then_merge_fidelity(tmp_path):
    out = tmp_path / "conv"
    stdout = run("convergence.py", "--arms", "lora", "is", "bs1", "--lrs", "1e-3", "3e-3", "--seeds", "0", "1",
                 "--steps", "2", "--eval_every", "1", "--sample_every", "2", "--sample_inference_steps", "2",
                 "--jobs", "1", "--out", str(out))
    assert "| ResLoRA is |" in stdout
    for name in ("curves.csv", "runs.csv", "results.md", "held_out_loss.png", "style_score.png", "lr_sweep.png",
                 "comparison_grid.png"):
        assert (out / name).exists(), name
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 3 * 2 + 3  # sweep on seed 0, then seed 1 at each arm's best LR
    summary = json.loads((out / "summary.json").read_text())
    for row in summary:  # the chosen LR is the one with the lowest final held-out loss on seed 0
        sweep = {float(k): v for k, v in row["sweep"].items()}
        assert float(row["best_lr"]) == min(sweep, key=sweep.get)
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert {int(r["step"]) for r in curves} == {0, 1, 2}
    assert all(float(r["held_out_loss"]) > 0 for r in curves)

    stdout = run("merge_fidelity.py", "--results", str(out), "--arms", "is", "bs1", "--threads", "1",
                 "--sample_inference_steps", "2")
    rows = list(csv.DictReader(open(out / "merge_fidelity.csv")))
    merges = {(r["arm"], r["merge"]) for r in rows}
    assert {("ResLoRA is", m) for m in ("unmerged", "no", "bi", "bw", "ls")} <= merges
    assert all(float(r["relative_output_error"]) < 1e-5 for r in rows if r["merge"] == "exact")
    assert any(float(r["relative_output_error"]) > 0 for r in rows if r["merge"] == "no")  # is: 'no' is inexact
