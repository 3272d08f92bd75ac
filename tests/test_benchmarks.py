"""The convergence and merge-fidelity benchmarks run end to end (a few steps; the real runs are in docs/)."""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_arms_share_init_and_data():
    from benchmarks import _sd_bench as bench

    ctx = bench.BenchContext(num_train=16, num_held_out=32)
    lora = ctx.fresh_unet(bench.ARMS["lora"], seed=3)
    ms = ctx.fresh_unet(bench.ARMS["ms4"], seed=3)
    a_lora = {n: p for n, p in lora.named_parameters() if "lora_A" in n}
    a_ms = dict(ms.named_parameters())
    assert a_lora and all(torch.equal(p, a_ms[n]) for n, p in a_lora.items())  # same LoRA init for a seed
    x1, h1, g1 = ctx.batch(seed=3, step=5, batch_size=4)
    x2, h2, g2 = ctx.batch(seed=3, step=5, batch_size=4)
    x3, _, _ = ctx.batch(seed=4, step=5, batch_size=4)
    assert torch.equal(x1, x2) and torch.equal(h1, h2) and not torch.equal(x1, x3)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))  # the same noise follows


def test_convergence_then_merge_fidelity(tmp_path):
    """The tuned protocol, checked from its own CSV: the chosen LR is the tuning argmin (and the grid grew
    while it sat at an edge), the evaluation seeds are not the tuning seeds, LoRA also ran at its LR / sqrt(2)
    and x sqrt(2), and the paired differences are the arms' export losses minus LoRA's."""
    out = tmp_path / "conv"
    stdout = run("convergence.py", "--arms", "lora", "is", "--lrs", "1e-3", "2e-3", "--tune_seeds", "100",
                 "--eval_seeds", "0", "--steps", "2", "--eval_every", "1", "--max_extend", "1", "--jobs", "1",
                 "--out", str(out))
    assert "| ResLoRA is |" in stdout
    for name in ("curves.csv", "runs.csv", "results.md", "summary.json", "export_curve.png", "lr_sweep.png"):
        assert (out / name).exists(), name
    runs = list(csv.DictReader(open(out / "runs.csv")))
    tuning, evaluation = [r for r in runs if r["phase"] == "tune"], [r for r in runs if r["phase"] == "eval"]
    assert {r["seed"] for r in tuning} == {"100"} and {r["seed"] for r in evaluation} == {"0"}
    rows = {r["arm"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    export = {(r["arm"], float(r["lr"]), r["phase"]): float(r["held_out_loss_export"]) for r in runs}
    for arm, row in rows.items():
        grid = sorted(lr for (a, lr, phase) in export if a == arm and phase == "tune")
        best = min(grid, key=lambda lr: export[(arm, lr, "tune")])
        assert float(row["lr"]) == pytest.approx(best)
        if set(grid) == {1e-3, 2e-3}:  # no extension: the best rate was interior, which 2 points cannot be
            raise AssertionError(f"{arm}: the grid was not extended although its best rate was at an edge")
        lora_lr = float(rows["lora"]["lr"])
        diff = export[(arm, best, "eval")] - export[("lora", lora_lr, "eval")]
        assert row["vs_lora"][0] == pytest.approx(diff)
    lora_lrs = sorted(float(r["lr"]) for r in evaluation if r["arm"] == "lora")
    assert lora_lrs == pytest.approx([float(rows["lora"]["lr"]) * k for k in (2 ** -0.5, 1, 2 ** 0.5)])
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert {int(r["step"]) for r in curves} == {0, 1, 2}
    assert all(float(r["held_out_loss_export"]) > 0 for r in curves)

    stdout = run("merge_fidelity.py", "--results", str(out), "--arms", "is", "--threads", "1",
                 "--sample_inference_steps", "2")
    rows = list(csv.DictReader(open(out / "merge_fidelity.csv")))
    merges = {(r["arm"], r["merge"]) for r in rows}
    assert {("ResLoRA is", m) for m in ("unmerged", "no", "bi", "bw", "ls")} <= merges
    assert any(float(r["relative_output_error"]) > 0 for r in rows if r["merge"] == "no")  # is: 'no' is inexact


def test_unet_subset_arms_train_exactly_their_parameters():
    """benchmarks.unet_subsets: 'attention' trains the 128 projections command 1 adapts, 'rest' everything else,
    'lora' only LoRA factors on those projections; one step changes nothing outside the arm."""
    from benchmarks import _sd_bench as bench
    from benchmarks import unet_subsets as subsets

    assert subsets.parse_arm("lora16:3e-3") == ("lora16", 3e-3) and subsets.lora_rank("lora") == 4
    for bad in ("lora0:1e-3", "attn:1e-3", "rest"):
        with pytest.raises(argparse.ArgumentTypeError):
            subsets.parse_arm(bad)
    ctx = bench.BenchContext(num_train=16, num_held_out=32)
    suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")  # written out here, not taken from TARGET_MODULES
    projections = [m for m, mod in ctx.base_unet.named_modules()
                   if m.endswith(suffixes) and isinstance(mod, torch.nn.Linear)]
    assert len(projections) == 128
    expected = {f"{m}.{p}" for m in projections for p, _ in ctx.base_unet.get_submodule(m).named_parameters()}
    every = {n for n, _ in ctx.base_unet.named_parameters()}
    base = {n: p.detach().clone() for n, p in ctx.base_unet.named_parameters()}

    def trainable(arm):
        unet, params = subsets.trainable_unet(ctx, arm, seed=0)
        names = {n for n, p in unet.named_parameters() if p.requires_grad}
        assert len(names) == len(params)
        return names

    assert trainable("attention") == expected
    assert trainable("rest") == every - expected
    assert trainable("all") == every
    lora = trainable("lora")
    assert len(lora) == 2 * 128 and all("lora_" in n for n in lora)
    assert {n.split(".lora_")[0].removesuffix(".base_layer") for n in lora} == set(projections)
    unet16, _ = subsets.trainable_unet(ctx, "lora16", seed=0)
    assert unet16.get_submodule(projections[0]).lora_A["default"].weight.shape[0] == 16

    for arm, own in (("attention", expected), ("rest", every - expected)):
        unet, _, loss, _ = subsets.fine_tune(ctx, arm, lr=1e-3, seed=0, steps=1)
        changed = {n for n, p in unet.named_parameters() if not torch.equal(p, base[n])}
        assert changed and changed <= own and loss > 0
