#!/usr/bin/env python
"""Compare training runs side by side over steps in one labelled grid (as the paper's figure 3).

    python examples/generate_progress_grid.py runs/lora runs/is runs/bs runs/ms \\
        --labels LoRA ResLoRA-is ResLoRA-bs ResLoRA-ms --out compare.png

Rows are (prompt, run) pairs; columns are the snapshot steps that every run has. It reads the
``samples/step-XXXXXX/prompt-PP_seed-S.png`` files that train_text_to_image_reslora.py writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from reslora_diffusers.demo.grids import make_grid


def run_steps(run: Path) -> dict[int, Path]:
    return {int(d.name.split("-")[1]): d for d in (run / "samples").glob("step-*") if d.is_dir()}


def build_grid(runs: list[Path], labels: list[str], prompt_indices=None, seed: int = 0, max_columns: int = 8):
    steps_by_run = [run_steps(r) for r in runs]
    for run, steps in zip(runs, steps_by_run):
        if not steps:
            raise SystemExit(f"{run} has no samples/step-* folders: is it an output_dir of train_text_to_image_reslora.py?")
    common = sorted(set.intersection(*(set(s) for s in steps_by_run)))
    if not common:
        raise SystemExit("The runs share no snapshot step; train them with the same --sample_steps.")
    if len(common) > max_columns:  # keep first and last, spread the rest
        pick = [common[round(i * (len(common) - 1) / (max_columns - 1))] for i in range(max_columns)]
        common = sorted(set(pick))
    prompts = json.loads((steps_by_run[0][common[0]] / "prompts.json").read_text())["prompts"]
    indices = prompt_indices if prompt_indices is not None else range(len(prompts))
    rows, row_labels = [], []
    for p in indices:
        for label, steps in zip(labels, steps_by_run):
            rows.append([Image.open(steps[s] / f"prompt-{p:02d}_seed-{seed}.png").convert("RGB") for s in common])
            row_labels.append(f"{label}: {prompts[p]}")
    return make_grid(rows, row_labels=row_labels, col_labels=[f"step {s}" for s in common])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each run")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: folder names)")
    parser.add_argument("--prompt_index", type=int, nargs="+", default=None, help="prompts to show (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_columns", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("progress_comparison.png"))
    args = parser.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error("give one --labels entry per run")
    grid = build_grid(args.runs, labels, args.prompt_index, args.seed, args.max_columns)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
