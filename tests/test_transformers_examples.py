"""The transformers examples (RoBERTa classification, LLaMA causal LM) run offline and export merged
adapters that stock peft loads.

Each example runs a few steps per structure in process (``main(argv, return_state=True)``); one run per
script goes through the command line and its JSON summary line. Tiny sizes: the offline base is
pretrained for a handful of steps once per script (cached in a temporary directory).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from examples import train_llama_reslora, train_roberta_glue_reslora
from reslora_diffusers import merged_view
from reslora_diffusers.integrations import distributed
from reslora_diffusers.integrations.transformers_finetune import parse_summary

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

STRUCTURES = ["none", "is", "bs", "ms"]
SCHEDULES = {  # merge-aware training: the shortcuts are gone by the end, so the export is exact
    "is-decay": ["--shortcut_decay", "0.2", "0.6"],
    "ms-merge_at": ["--merge_at", "0.5"],
}
EXACT = ("none", "bs", *SCHEDULES)

TINY = {
    "roberta": [
        "--offline", "--offline_pretrain_steps", "8", "--offline_hidden_size", "32", "--offline_num_layers", "3",
        "--offline_num_train", "64", "--offline_num_eval", "32", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "32", "--max_train_steps", "3", "--learning_rate", "5e-3",
        "--calibration_batches", "2", "--no_progress_bar",
    ],
    "llama": [
        "--offline", "--offline_pretrain_steps", "8", "--offline_hidden_size", "32", "--offline_num_layers", "3",
        "--offline_num_train", "64", "--offline_num_eval", "16", "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16", "--max_train_steps", "3", "--learning_rate", "5e-3",
        "--calibration_batches", "2", "--max_new_tokens", "5", "--no_progress_bar",
    ],
}
SCRIPTS = {"roberta": train_roberta_glue_reslora, "llama": train_llama_reslora}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """One cached tiny base per script, shared by every structure."""
    root = tmp_path_factory.mktemp("bases")
    return {name: str(root / name) for name in SCRIPTS}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(name, structure, out_dir, base_dir, merge="bi"):
    """``structure`` is a structure, or one of SCHEDULES ("is-decay": structure is with its flags)."""
    plain = structure.split("-")[0]
    argv = TINY[name] + ["--reslora_structure", plain, "--pre_num", "2" if plain == "ms" else "1", "--merge", merge,
                         "--output_dir", str(out_dir), "--offline_base_dir", base_dir, "--rank", "2", "--lora_alpha", "4",
                         *SCHEDULES.get(structure, [])]
    return SCRIPTS[name].main(argv, return_state=True)


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.parametrize("structure", STRUCTURES + list(SCHEDULES))
@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_example_exports_a_plain_lora_that_stock_peft_reproduces(name, structure, tmp_path, base_dirs, one_thread):
    state = _run(name, structure, tmp_path / "out", base_dirs[name], merge="ls" if structure.startswith("ms") else "bi")
    summary, model, result = state["summary"], state["model"], state["merge_result"]
    forward_fn, batches = state["forward_fn"], state["compare_batches"]

    # the summary line was written and says what the tests need
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["structure"] == structure.split("-")[0] and on_disk["steps"] == 3
    for key in ("accuracy_before_finetuning", "accuracy_before_merge", "accuracy_after_merge", "accuracy_stock_peft"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["accuracy_stock_peft"] == summary["accuracy_after_merge"]
    err = summary["merge_error"]
    assert _finite(err["relative_output_error"]) and _finite(err["relative_adapter_error"])
    if structure in EXACT:
        assert err["relative_output_error"] < 1e-5
    if structure in SCHEDULES:
        assert err["method"] == "exact" and err["relative_output_error"] < 1e-6
    assert summary["max_abs_logit_diff_stock_vs_merged"] < 1e-5

    # a plain LoRA config, and the classifier head travels with the RoBERTa adapter
    adapter_dir = Path(summary["adapter_dir"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert not (adapter_dir / "reslora_training_state.json").exists()
    if name == "roberta":
        from safetensors.torch import load_file

        keys = load_file(str(adapter_dir / "adapter_model.safetensors")).keys()
        assert any(".classifier." in k for k in keys)
        assert config["modules_to_save"] == ["classifier"]

    # independently: a fresh base + stock PeftModel.from_pretrained
    stock = PeftModel.from_pretrained(state["load_base"](), str(adapter_dir)).eval()
    model.eval()
    with torch.no_grad():
        stock_out = [forward_fn(stock, b) for b in batches]
        unmerged = [forward_fn(model, b) for b in batches]
        with merged_view(model, result):
            merged = [forward_fn(model, b) for b in batches]
    for s, m in zip(stock_out, merged):
        torch.testing.assert_close(s, m, atol=1e-5, rtol=1e-5)
    if structure in EXACT:  # exact merges: stock peft == the unmerged ResLoRA model
        for s, u in zip(stock_out, unmerged):
            torch.testing.assert_close(s, u, atol=1e-5, rtol=1e-5)
        if structure == "bs":
            assert err["max_rank"] > 2  # linked layers export rank (m + 1) r
    else:  # is/ms: lossy, but measured; the adapter must actually differ from the base
        assert err["relative_adapter_error"] > 0.0  # linked layers exist, so the merge is not exact
        with torch.no_grad():
            base_out = [forward_fn(state["load_base"]().eval(), b) for b in batches]
        assert any(float((s - b).abs().max()) > 1e-6 for s, b in zip(stock_out, base_out))


@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_eval_steps_records_metric_vs_step(name, tmp_path, base_dirs, one_thread):
    """--eval_steps 2 over 3 steps: step 0 (before fine-tuning), step 2, and the final step 3 (epoch end)."""
    argv = TINY[name] + ["--reslora_structure", "is", "--eval_steps", "2", "--output_dir", str(tmp_path / "out"),
                         "--offline_base_dir", base_dirs[name], "--rank", "2", "--lora_alpha", "4"]
    summary = SCRIPTS[name].main(argv)
    history = summary["eval_history"]
    assert [h["step"] for h in history] == [0, 2, 3]
    assert history[0]["metric"] == summary["accuracy_before_finetuning"]
    assert history[-1]["metric"] == summary["accuracy_before_merge"]
    assert all(0.0 <= h["metric"] <= 1.0 for h in history)
    assert summary["train_seconds"] > 0.0
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["eval_history"] == history


@pytest.mark.parametrize("name,script", [("roberta", "train_roberta_glue_reslora.py"), ("llama", "train_llama_reslora.py")])
def test_command_line_prints_a_json_summary(name, script, tmp_path, base_dirs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    argv = TINY[name] + ["--reslora_structure", "bs", "--output_dir", str(tmp_path / "out"),
                         "--offline_base_dir", base_dirs[name] + "-cli", "--num_threads", "1", "--max_train_steps", "2"]
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *argv], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = parse_summary(proc.stdout)
    assert proc.stdout.strip().splitlines()[-1].startswith("{")
    assert summary["structure"] == "bs" and summary["steps"] == 2
    assert summary["max_abs_logit_diff_stock_vs_unmerged"] < 1e-5
    assert summary["accuracy_stock_peft"] == summary["accuracy_after_merge"] == summary["accuracy_before_merge"]


# ------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_examples_use_the_shared_reslora_defaults(name):
    """No example overrides a ResLoRA default: structure is, m 1, rank 4, alpha = rank, merge ls, 4 batches."""
    from reslora_diffusers.integrations.cli import RESLORA_DEFAULTS, reslora_config_from_args

    args = SCRIPTS[name].parse_args([])
    assert {k: getattr(args, k) for k in RESLORA_DEFAULTS} == RESLORA_DEFAULTS
    config = reslora_config_from_args(args, args.target_modules)
    assert (config.structure, config.pre_num, config.r, config.lora_alpha) == ("is", 1, 4, 4.0)


@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_deprecated_flag_names_still_work_with_a_warning(name, capsys):
    args = SCRIPTS[name].parse_args(["--structure", "ms", "--num_calibration_batches", "3"])
    assert args.reslora_structure == "ms" and args.calibration_batches == 3
    err = capsys.readouterr().err
    assert "--structure is deprecated" in err and "use --reslora_structure" in err
    assert "--num_calibration_batches is deprecated" in err and "use --calibration_batches" in err
    assert args.output_dir == os.path.join("outputs", f"{name}-offline-ms")


@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_demo_task_parses_like_the_example_in_offline_mode(name):
    """The benchmarks train through ``tiny_*_task.train``: the example's flags and defaults, without the hub ones."""
    from reslora_diffusers.demo import tiny_llama_task, tiny_roberta_task

    demo = {"roberta": tiny_roberta_task, "llama": tiny_llama_task}[name]
    example = vars(SCRIPTS[name].parse_args(["--output_dir", "x"]))
    offline = vars(demo.parser().parse_args(["--output_dir", "x"]))
    hub_only = {"roberta": {"task_name"}, "llama": {"dataset_name", "dataset_config_name"}}[name]
    assert set(example) - set(offline) == hub_only
    example["offline"] = offline["offline"] = True
    if name == "llama":
        offline["max_new_tokens"] = example["max_new_tokens"]  # resolved per mode after parsing
    assert {k: v for k, v in example.items() if k not in hub_only} == offline


# ------------------------------------------------------------------------- distributed modes
def _fake_accelerator(kind, zero_stage=None):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("kind,stage,expected", [
    ("NO", None, "single process"),
    ("MULTI_GPU", None, "DDP (MULTI_GPU)"),
    ("MULTI_CPU", None, "DDP (MULTI_CPU)"),
    ("DEEPSPEED", 1, "DeepSpeed ZeRO-1"),
    ("DEEPSPEED", 2, "DeepSpeed ZeRO-2"),
])
def test_supported_distributed_modes_pass(kind, stage, expected):
    assert distributed.check_distributed_mode(_fake_accelerator(kind, stage)) == expected


@pytest.mark.parametrize("kind,stage,named", [
    ("FSDP", None, "FSDP"),
    ("DEEPSPEED", 3, "ZeRO stage 3"),
    ("MEGATRON_LM", None, "MEGATRON_LM"),
    ("XLA", None, "XLA"),
])
def test_unsupported_distributed_modes_are_refused_with_the_supported_list(kind, stage, named):
    with pytest.raises(distributed.UnsupportedDistributedMode) as info:
        distributed.check_distributed_mode(_fake_accelerator(kind, stage))
    message = str(info.value)
    assert named in message
    assert "single process" in message and "DDP" in message and "ZeRO stage 1/2" in message


def _deepspeed_accelerator(**config):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=2, deepspeed_config=config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("config,accumulation,max_norm,named", [
    ({"gradient_accumulation_steps": 1, "gradient_clipping": 1.0}, 2, 1.0, "gradient_accumulation_steps 1"),
    ({"gradient_accumulation_steps": 2, "gradient_clipping": 1.0}, 2, 0.5, "clips gradients at 1"),
    ({"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}, 4, 0.0, "--max_grad_norm is 0"),
])
def test_deepspeed_config_disagreeing_with_the_flags_is_refused(config, accumulation, max_norm, named):
    with pytest.raises(distributed.UnsupportedDistributedMode) as info:
        distributed.check_deepspeed_config(_deepspeed_accelerator(**config), accumulation, max_norm)
    assert named in str(info.value) and "DeepSpeed config" in str(info.value)


@pytest.mark.parametrize("config,accumulation,max_norm", [
    ({"gradient_accumulation_steps": 2, "gradient_clipping": 0.5}, 2, 0.5),
    ({"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}, 3, 1.0),  # accelerate fills auto
    ({"gradient_accumulation_steps": 1, "gradient_clipping": 0.0}, 1, None),  # no clipping on either side
])
def test_deepspeed_config_matching_the_flags_passes(config, accumulation, max_norm):
    distributed.check_deepspeed_config(_deepspeed_accelerator(**config), accumulation, max_norm)
    distributed.check_deepspeed_config(_fake_accelerator("MULTI_CPU"), accumulation, max_norm)  # not DeepSpeed: no check


def test_deepspeed_without_cuda_gets_gloo(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (handler,) = distributed.process_group_kwargs()
    assert handler.to_kwargs()["backend"] == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.process_group_kwargs() == []  # on CUDA accelerate picks nccl itself
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.process_group_kwargs() == []


def test_real_accelerator_single_process_is_accepted():
    from accelerate import Accelerator

    assert distributed.check_distributed_mode(Accelerator(cpu=True)) == "single process"
