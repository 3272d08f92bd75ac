"""Multi-process training is equivalent to one process with gradient accumulation; bf16 keeps LoRA in fp32.

Two CPU processes (gloo) with per-process batch 2 against one process with batch 2 and gradient
accumulation 2: the same examples, noise and timesteps make each global batch, so the LoRA weights
must match after the same number of steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_text_to_image_reslora.py"


def launch(num_processes, args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env["ACCELERATE_USE_CPU"] = "true"  # without it, torchrun workers on a machine without GPUs each train alone
    # `--cpu` always takes accelerate's single-process launcher; `--multi_gpu` on a machine without GPUs
    # starts torchrun workers that train as MULTI_CPU (gloo).
    mode = ["--multi_gpu", "--main_process_port", "29517"] if num_processes > 1 else ["--cpu"]
    precision = [] if "--mixed_precision" in args else ["--mixed_precision", "no"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
        "--num_machines", "1", "--dynamo_backend", "no", *precision, str(SCRIPT), *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


COMMON = ["--max_train_steps", "3", "--pokemon_style_size", "12", "--sample_steps", "3", "--checkpointing_steps", "100",
          "--sample_num_inference_steps", "2", "--report_to", "none", "--random_flip", "--calibration_batches", "2",
          "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["is", "bs", "ms"])
def test_two_processes_equal_one_process_with_accumulation(structure, tmp_path):
    args = [*COMMON, "--reslora_structure", structure, "--pre_num", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, ["--output_dir", str(one), "--train_batch_size", "2", "--gradient_accumulation_steps", "2", *args])
    proc = launch(2, ["--output_dir", str(two), "--train_batch_size", "2", *args])
    assert "DDP (MULTI_CPU)" in proc.stdout + proc.stderr  # really two processes
    a = load_file(str(one / "reslora_training_state.safetensors"))
    b = load_file(str(two / "reslora_training_state.safetensors"))
    lora = [k for k in a if k.endswith(("lora_A", "lora_B"))]
    assert lora and set(a) == set(b)
    assert max(a[k].abs().max() for k in lora if k.endswith("lora_B")) > 0  # training moved B off its zero init
    for key in lora:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    # only the main process wrote samples, one copy each, and one export
    assert len(list((two / "samples" / "step-000003").glob("prompt-*_seed-0.png"))) == 3
    assert (two / "pytorch_lora_weights.safetensors").exists()
    report = json.loads((two / "merge_report.json").read_text())
    assert report["steps"] == 3


@pytest.mark.slow
def test_bf16_on_cpu_keeps_lora_and_statistics_in_fp32(tmp_path):
    launch(1, ["--output_dir", str(tmp_path), "--mixed_precision", "bf16", "--reslora_structure", "is",
               "--train_batch_size", "2", *COMMON])
    state = load_file(str(tmp_path / "reslora_training_state.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert any(k.endswith("norm_window") for k in state)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
