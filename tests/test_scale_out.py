"""Multi-process training is equivalent to one process with gradient accumulation; bf16 keeps LoRA in fp32.

Two CPU processes (gloo) with per-process batch b against one process with batch b and gradient
accumulation 2: the same examples (and, for SD, noise and timesteps) make each global batch, so the
LoRA weights must match after the same number of steps. Checked for the SD training script and the
LLaMA example. The 'bi' merge statistics are averaged over ranks by ``sync_statistics()``: checked
with two real gloo processes fed different data.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_text_to_image_reslora.py"
LLAMA_SCRIPT = ROOT / "examples" / "train_llama_reslora.py"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(num_processes, args, timeout=900, script=SCRIPT, deepspeed_config=None, returncode=0):
    env = dict(os.environ, **ENV)
    if deepspeed_config is not None:  # DeepSpeed's own CPU accelerator; ACCELERATE_USE_CPU would turn it into DDP
        env.pop("ACCELERATE_USE_CPU", None)
        mode = ["--config_file", str(deepspeed_config), "--main_process_port", str(free_port())]
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # without it, torchrun workers on a machine without GPUs each train alone
        # `--cpu` always takes accelerate's single-process launcher; `--multi_gpu` on a machine without GPUs
        # starts torchrun workers that train as MULTI_CPU (gloo).
        mode = ["--multi_gpu", "--main_process_port", str(free_port())] if num_processes > 1 else ["--cpu"]
    precision = [] if "--mixed_precision" in args else ["--mixed_precision", "no"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
        "--num_machines", "1", "--dynamo_backend", "no", *precision, str(script), *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == returncode, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def write_deepspeed_config(path, zero_stage):
    """The shipped CPU DeepSpeed config (2 processes, fp32), with the given ZeRO stage."""
    text = (ROOT / "examples" / "accelerate_configs" / "deepspeed_zero2_cpu.yaml").read_text()
    assert "  zero_stage: 2\n" in text
    path.write_text(text.replace("  zero_stage: 2\n", f"  zero_stage: {zero_stage}\n"))
    return path


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def assert_same_lora(a_path, b_path):
    """Two training states hold the same LoRA weights, and training moved them."""
    a, b = load_file(str(a_path)), load_file(str(b_path))
    lora = [k for k in a if k.endswith(("lora_A", "lora_B"))]
    assert lora and set(a) == set(b)
    assert max(a[k].abs().max() for k in lora if k.endswith("lora_B")) > 0  # training moved B off its zero init
    for key in lora:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def assert_same_tensors(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a and set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


COMMON = ["--max_train_steps", "3", "--pokemon_style_size", "12", "--sample_steps", "3", "--checkpointing_steps", "100",
          "--sample_num_inference_steps", "2", "--report_to", "none", "--random_flip", "--calibration_batches", "2",
          "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--rank", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("structure,schedule", [
    ("is", ["--shortcut_decay", "0.2", "0.9"]),  # lambda 0.91 and 0.25 in steps 2 and 3
    ("bs", []),
    ("ms", ["--merge_at", "0.5"]),  # merged in place on both ranks after step 2
])
def test_two_processes_equal_one_process_with_accumulation(structure, schedule, tmp_path):
    args = [*COMMON, "--reslora_structure", structure, "--pre_num", "2", *schedule]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, ["--output_dir", str(one), "--train_batch_size", "2", "--gradient_accumulation_steps", "2", *args])
    proc = launch(2, ["--output_dir", str(two), "--train_batch_size", "2", *args])
    assert "DDP (MULTI_CPU)" in proc.stdout + proc.stderr  # really two processes
    assert_same_lora(one / "reslora_training_state.safetensors", two / "reslora_training_state.safetensors")
    # only the main process wrote samples, one copy each, and one export
    assert len(list((two / "samples" / "step-000003").glob("prompt-*_seed-0.png"))) == 3
    assert (two / "pytorch_lora_weights.safetensors").exists()
    report = json.loads((two / "merge_report.json").read_text())
    assert report["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_keeps_lora_and_statistics_in_fp32(precision, tmp_path):
    """The frozen base runs in bf16/fp16 and the LoRA weights and 'bi' windows stay fp32 (the fp16 run on
    CPU has no GradScaler: accelerate only scales losses on GPUs)."""
    launch(1, ["--output_dir", str(tmp_path), "--mixed_precision", precision, "--reslora_structure", "is",
               "--train_batch_size", "2", *COMMON])
    state = load_file(str(tmp_path / "reslora_training_state.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert any(k.endswith("norm_window") for k in state)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("zero_stage,structure", [(1, "bs"), (2, "ms")])
def test_deepspeed_zero_equals_one_process_and_resumes(zero_stage, structure, tmp_path):
    """DeepSpeed ZeRO-1/2 on 2 CPU processes (gloo), interrupted after step 2 and resumed, ends where one
    process with accumulation 2 ends after 3 steps. ZeRO-1/2 partition optimizer state (and, for 2,
    gradients) but not parameters, so ResLoRA's cross-layer reads see full weights."""
    args = [*COMMON, "--reslora_structure", structure, "--pre_num", "2", "--checkpointing_steps", "2"]
    one, ds = tmp_path / "one", tmp_path / "ds"
    config = write_deepspeed_config(tmp_path / "zero.yaml", zero_stage)
    launch(1, ["--output_dir", str(one), "--train_batch_size", "2", "--gradient_accumulation_steps", "2", *args])
    run = ["--output_dir", str(ds), "--train_batch_size", "2", *args]
    first = launch(2, [*run, "--simulate_interrupt_at_step", "2"], deepspeed_config=config, returncode=1)
    assert f"DeepSpeed ZeRO-{zero_stage}, 2 process(es)" in first.stdout + first.stderr  # really DeepSpeed, 2 ranks
    checkpoint = ds / "checkpoint-2"
    assert checkpoint.is_dir() and not list(ds.glob(".checkpoint-*"))
    # the DeepSpeed part of the checkpoint holds the LoRA state, not the frozen UNet
    base_bytes = sum(f.stat().st_size for f in (ROOT / "reslora_diffusers" / "demo" / "assets" / "tiny-sd2-base" / "unet").glob("*"))
    module_files = list(checkpoint.rglob("*model_states.pt"))
    assert module_files and max(f.stat().st_size for f in module_files) < base_bytes / 4
    launch(2, [*run, "--resume_from_checkpoint", "latest"], deepspeed_config=config)
    assert_same_lora(one / "reslora_training_state.safetensors", ds / "reslora_training_state.safetensors")
    assert (ds / "pytorch_lora_weights.safetensors").exists()


# ------------------------------------------------------------------------------ LLaMA example
# Same sizes as every launch below, so the base pretrained once by the fixture is reused (its recipe stamp matches).
LLAMA_BASE = ["--offline", "--offline_pretrain_steps", "8", "--offline_hidden_size", "32", "--offline_num_layers", "3"]
LLAMA_COMMON = [
    *LLAMA_BASE, "--offline_num_train", "64", "--offline_num_eval", "8", "--per_device_eval_batch_size", "8",
    "--max_new_tokens", "5", "--max_train_steps", "3", "--learning_rate", "5e-3", "--rank", "2", "--lora_alpha", "4",
    "--calibration_batches", "2", "--lr_scheduler_type", "linear", "--num_warmup_steps", "2", "--no_progress_bar",
    "--merge", "bi", "--num_threads", "1",
]


LLAMA_STATE = "reslora_training_state/reslora_training_state.safetensors"
LLAMA_ADAPTER = "merged_adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """The tiny offline LLaMA base, pretrained once in this process and shared by every launch."""
    from examples import train_llama_reslora
    from reslora_diffusers.demo.tiny_llama_task import build_offline_base
    from reslora_diffusers.integrations.transformers_finetune import offline_recipe_kwargs

    base = tmp_path_factory.mktemp("llama-base") / "base"
    build_offline_base(str(base), **offline_recipe_kwargs(train_llama_reslora.parse_args(LLAMA_BASE)))
    return base


def _tree(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["is", "bs", "ms"])
def test_llama_two_processes_equal_one_process_with_accumulation(structure, tmp_path, llama_base):
    """LLaMA example: 2 processes x batch 4 == 1 process x batch 4 x accumulation 2 (weights and merged export).

    The loss is the token mean of each micro-batch. Accelerate's accumulation divides each micro-batch's
    loss by the number of micro-batches and DDP averages the ranks' gradients, so both optimise the
    mean over micro-batches of the micro-batch token means, whatever the token counts (only one batch
    of 8 would weigh tokens differently). The offline labels are 5 tokens anyway ("The answer is N" +
    EOS). Warmup is on, so the scheduler's per-process stepping is covered; the 'bi' export of is/ms
    covers the ranks' statistics being averaged before the merge.
    """
    base_files = {p: p.stat().st_mtime_ns for p in llama_base.rglob("*")}
    args = [*LLAMA_COMMON, "--reslora_structure", structure, "--pre_num", "2", "--offline_base_dir", str(llama_base),
            "--per_device_train_batch_size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, [*args, "--gradient_accumulation_steps", "2", "--output_dir", str(one)], timeout=300, script=LLAMA_SCRIPT)
    proc = launch(2, [*args, "--output_dir", str(two)], timeout=300, script=LLAMA_SCRIPT)

    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"accuracy_after_merge"' in line]
    summaries = [json.loads(line) for line in lines]
    assert len(summaries) == 1 and summaries[0]["distributed"] == "DDP (MULTI_CPU)"  # really two processes
    assert summaries[0]["steps"] == 3
    assert json.loads((one / "summary.json").read_text())["distributed"] == "single process"
    # both runs started from the fixture's base (not rebuilt), and wrote the same files (the main process only)
    assert {p: p.stat().st_mtime_ns for p in llama_base.rglob("*")} == base_files
    assert _tree(one) == _tree(two)

    assert_same_lora(one / LLAMA_STATE, two / LLAMA_STATE)
    # the exported plain LoRA: for is/ms it uses the 'bi' windows, averaged over the ranks before merging
    assert_same_tensors(one / LLAMA_ADAPTER, two / LLAMA_ADAPTER)


@pytest.mark.slow
@needs_deepspeed
def test_llama_deepspeed_zero2_equals_one_process_with_accumulation(tmp_path, llama_base):
    """The paper's LLaMA setup (DeepSpeed ZeRO-2), on 2 CPU processes: same LoRA weights and 'bi' export
    as one process with accumulation 2, for 'is' (activations read across layers)."""
    args = [*LLAMA_COMMON, "--reslora_structure", "is", "--pre_num", "2", "--offline_base_dir", str(llama_base),
            "--per_device_train_batch_size", "4"]
    one, ds = tmp_path / "one", tmp_path / "ds"
    launch(1, [*args, "--gradient_accumulation_steps", "2", "--output_dir", str(one)], timeout=300, script=LLAMA_SCRIPT)
    proc = launch(2, [*args, "--output_dir", str(ds)], timeout=300, script=LLAMA_SCRIPT,
                  deepspeed_config=write_deepspeed_config(tmp_path / "zero2.yaml", 2))
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{") and '"accuracy_after_merge"' in line]
    assert len(summaries) == 1 and summaries[0]["distributed"] == "DeepSpeed ZeRO-2"
    assert _tree(one) == _tree(ds)
    assert_same_lora(one / LLAMA_STATE, ds / LLAMA_STATE)
    assert_same_tensors(one / LLAMA_ADAPTER, ds / LLAMA_ADAPTER)


# --------------------------------------------------------------------- 'bi' statistics sync
BI_WINDOW, BI_FORWARDS = 3, 5  # more forwards than the window holds: the ring buffer wraps


def _bi_model(structure):
    from tiny_models import CASES, randomize_lora

    from reslora_diffusers import ResLoRAConfig, inject_reslora

    case = CASES["llama"]
    model = case.build()
    inject_reslora(model, ResLoRAConfig(structure=structure, pre_num=2, r=2, lora_alpha=4, target_modules=case.targets,
                                        merge_window=BI_WINDOW))
    randomize_lora(model)  # identical on every rank
    return model, case


def _bi_record(structure, rank):
    """Unsynced windows after BI_FORWARDS training-mode forwards on rank ``rank``'s data."""
    from reslora_diffusers.core.model import get_controller

    model, case = _bi_model(structure)
    model.train()
    with torch.no_grad():
        for i in range(BI_FORWARDS):
            case.output(model, case.batch(1000 * (rank + 1) + i))  # different data on each rank
    return model, get_controller(model)


def _windows(controller):
    return {name: (v.norm_window.clone(), v.norm_count) for name, v in controller.variants.items()}


def _bi_factors(model):
    from reslora_diffusers import merge_reslora

    return {name: (a.clone(), b.clone()) for name, (a, b) in merge_reslora(model, method="bi").factors.items()}


def _bi_worker(structure, rank, world, port, out):
    """Run in a subprocess: one gloo rank records, syncs and merges."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, controller = _bi_record(structure, rank)
        before = _windows(controller)
        controller.sync_statistics()
        torch.save({"before": before, "after": _windows(controller), "factors": _bi_factors(model)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["is", "ms"])
def test_bi_statistics_identical_on_every_rank_after_sync(structure, tmp_path):
    port, tests = free_port(), Path(__file__).resolve().parent
    env = dict(os.environ, **ENV)
    procs = []
    for rank in range(2):
        code = (f"import sys; sys.path[:0] = [{str(tests)!r}, {str(ROOT)!r}]; import test_scale_out as t; "
                f"t._bi_worker({structure!r}, {rank}, 2, {port}, {str(tmp_path / f'rank{rank}.pt')!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # the average over ranks, computed here without any process group
    local = [_windows(_bi_record(structure, r)[1]) for r in range(2)]
    names = sorted(local[0])
    assert names and all(local[0][n][1] == BI_FORWARDS for n in names)  # every layer recorded every forward
    for n in names:
        for r in range(2):  # each rank recorded what its data gives alone
            torch.testing.assert_close(ranks[r]["before"][n][0], local[r][n][0], atol=0, rtol=1e-6)
        assert not torch.allclose(local[0][n][0], local[1][n][0])  # the ranks' data differ, so the sync matters
        average = (local[0][n][0] + local[1][n][0]) / 2
        assert torch.equal(ranks[0]["after"][n][0], ranks[1]["after"][n][0])  # bitwise identical on every rank
        torch.testing.assert_close(ranks[0]["after"][n][0], average, atol=0, rtol=1e-6)

    # the 'bi' factors agree on both ranks and equal the merge of the averaged windows
    model, controller = _bi_record(structure, 0)
    alone = _bi_factors(model)  # rank 0's unsynced statistics
    for n, v in controller.variants.items():
        v.norm_window.copy_((local[0][n][0] + local[1][n][0]) / 2)
    expected, synced = _bi_factors(model), ranks[0]["factors"]
    assert set(expected) == set(synced) == set(ranks[1]["factors"])
    for n in expected:
        for k in range(2):
            assert torch.equal(synced[n][k], ranks[1]["factors"][n][k])
            torch.testing.assert_close(synced[n][k], expected[n][k], atol=1e-6, rtol=1e-5)
    # without the sync, rank 0 would merge otherwise (so the factor comparison can fail)
    assert any(not torch.allclose(alone[n][0], synced[n][0], atol=1e-6, rtol=1e-5) for n in expected)
