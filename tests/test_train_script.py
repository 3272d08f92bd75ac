"""train_text_to_image_reslora.py end to end on the embedded default, plus its input checks.

The runs go through ``accelerate launch`` in a subprocess, as users run it, for a few steps.
"""

import ast
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from reslora_diffusers import load_training_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_text_to_image_reslora.py"
import train_text_to_image_reslora as train  # the repository root is on pytest's pythonpath

ACCELERATE = [
    sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]
# rank 4 and shortcuts kept to the end (not the embedded base's rank 64 and decay), so is/ms merges are inexact
QUICK = [
    "--max_train_steps", "4", "--sample_steps", "2", "--checkpointing_steps", "2", "--train_batch_size", "4",
    "--pokemon_style_size", "16", "--sample_num_inference_steps", "3", "--calibration_batches", "2",
    "--report_to", "none", "--rank", "4", "--no_shortcut_decay",
]


def run_script(args, expect=0, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [*ACCELERATE, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def load_base_pipeline():
    from reslora_diffusers.demo.tiny_sd2 import load_tiny_base

    return load_tiny_base(torch.float32)


def unmerged_unet(run_dir):
    """The trained model as it was before merging: base UNet + the saved ResLoRA training state."""
    unet = load_base_pipeline().unet
    load_training_state(unet, str(run_dir))
    return unet.eval()


RUNS = {  # name: flags; "is-decay" anneals its shortcuts to 0 by 75% of training, so its export is exact; its
    # larger learning rate makes its step-2 merge visibly different from the trained model (0.5-1.9 of 255)
    "none": ["--reslora_structure", "none"],
    "is": ["--reslora_structure", "is"],
    "bs": ["--reslora_structure", "bs", "--pre_num", "2"],
    "ms": ["--reslora_structure", "ms", "--pre_num", "2"],
    "is-decay": ["--reslora_structure", "is", "--shortcut_decay", "0.25", "0.75", "--learning_rate", "2e-2"],
}
EXACT = ("none", "bs", "is-decay")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, flags in RUNS.items():
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        quick = [f for f in QUICK if f != "--no_shortcut_decay"] if "--shortcut_decay" in flags else QUICK
        proc = run_script(["--output_dir", str(run_dir), *flags, *quick])
        (run_dir / "launch.log").write_text(proc.stdout + proc.stderr)
        out[name] = run_dir
    return out


@pytest.mark.parametrize("structure", list(RUNS))
def test_run_writes_samples_grid_export_and_report(runs, structure):
    from reslora_diffusers.integrations.sd_run import load_calibration, unet_forward

    run_dir = runs[structure]
    for step in (0, 2, 4):
        assert len(list((run_dir / "samples" / f"step-{step:06d}").glob("prompt-*_seed-0.png"))) == 3
    assert (run_dir / "progress_grid.png").stat().st_size > 0
    assert (run_dir / "README.md").read_text().count("load_lora_weights") == 1
    report = json.loads((run_dir / "merge_report.json").read_text())
    assert report["structure"] == structure.split("-")[0] and report["steps"] == 4
    assert "relative_output_error" in report["held_out"]
    # the held-out merge-error inputs: timesteps stratified over [0, 1000), as many as the fit's
    assert report["held_out"]["timesteps"] == [125, 375, 625, 875] and report["held_out"]["num_inputs"] == 4
    keys = load_file(str(run_dir / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)

    pipe = load_base_pipeline()
    batch = load_calibration(str(run_dir))[-1]
    with torch.no_grad():
        before = unet_forward(pipe.unet, batch)
        pipe.load_lora_weights(str(run_dir))
        loaded = unet_forward(pipe.unet, batch)
    assert (loaded - before).abs().max() > 0  # the LoRA was applied
    unet = unmerged_unet(run_dir)
    with torch.no_grad():
        unmerged = unet_forward(unet, batch)
    rel = ((loaded - unmerged).norm() / unmerged.norm()).item()
    if structure in EXACT:  # exact merges
        torch.testing.assert_close(loaded, unmerged, atol=1e-4, rtol=1e-4)
        if structure == "is-decay":  # lambda is 0 at the end: the model as trained is the plain LoRA
            assert report["method"] == "exact" and report["shortcut_scale"] == 0.0
            assert report["held_out"]["relative_output_error"] < 1e-6
    else:  # the merge error the report gives for this held-out batch
        assert rel == pytest.approx(report["held_out"]["relative_output_error"], rel=0.5, abs=1e-6)
    with torch.no_grad():
        pipe.fuse_lora()
        fused = unet_forward(pipe.unet, batch)
    torch.testing.assert_close(fused, loaded, atol=1e-4, rtol=1e-4)


def resample_step(run_dir, step, merge=None):
    """The run's step-``step`` snapshot images redrawn in this process from checkpoint-``step``'s unmerged state,
    as the model is (``merge=None``) or through its ``merge`` view; with the snapshot settings of QUICK."""
    from diffusers import DDIMScheduler

    from reslora_diffusers import merged_view
    from reslora_diffusers.core.model import get_controller
    from reslora_diffusers.integrations.sd_run import load_calibration, merge_unet

    pipe = load_base_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    load_training_state(pipe.unet, str(run_dir / f"checkpoint-{step}"))
    pipe.unet.eval()
    lam = get_controller(pipe.unet).shortcut_scale
    prompts = json.loads((run_dir / "samples" / f"step-{step:06d}" / "prompts.json").read_text())["prompts"]
    with contextlib.ExitStack() as view:
        if merge is not None:
            view.enter_context(merged_view(pipe.unet, merge_unet(pipe.unet, merge, load_calibration(str(run_dir)))))
        images = [pipe(p, num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
                       generator=torch.Generator().manual_seed(0)).images[0] for p in prompts]
    return lam, images


def test_snapshots_draw_the_trained_model_when_the_export_will_be_it(runs):
    """--shortcut_decay makes the export the trained model, so its snapshots show the trained model, not the merge
    an export at that step would give (which is what runs without decay show)."""
    run_dir = runs["is-decay"]
    saved = [Image.open(run_dir / "samples" / "step-000002" / f"prompt-{i:02d}_seed-0.png").convert("RGB") for i in range(3)]
    lam, trained = resample_step(run_dir, 2)
    assert 0 < lam < 1  # the shortcuts are still on at step 2: the two views differ
    _, merged = resample_step(run_dir, 2, merge="ls")
    gap = lambda a, b: float(np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(a, b)]))  # noqa: E731
    assert gap(trained, merged) > 0.2  # of 255: the test can tell the views apart
    assert gap(saved, trained) < 0.05 < gap(saved, merged)


def test_remerge_cli_rewrites_export_with_another_method(runs, tmp_path):
    run_dir = runs["is"]
    out = tmp_path / "remerged"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "reslora_diffusers.integrations.merge", str(run_dir), "--merge", "ls", "--output_dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "ls"
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert f'load_lora_weights("{out}", weight_name=' in (out / "README.md").read_text()  # the card loads this export
    # it ends with the same summary as training does, warning above 5%
    held = report["held_out"]["relative_output_error"]
    assert f"UNet merge 'ls': on held-out batches the export's UNet output differs from the trained model's by " \
           f"{100 * held:.1f}%." in proc.stdout
    assert ("Warning: that is more than 5%" in proc.stdout) == (held > 0.05)


def test_resume_reaches_the_same_weights_and_statistics(tmp_path, capsys):
    common = ["--reslora_structure", "is", "--lr_scheduler", "cosine", "--max_train_steps", "6",
              "--checkpointing_steps", "3", "--sample_steps", "100", "--train_batch_size", "4",
              "--pokemon_style_size", "12", "--sample_num_inference_steps", "2", "--report_to", "none",
              "--random_flip", "--calibration_batches", "1"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_script(["--output_dir", str(full), *common])
    # the script exits 143 (128 + SIGTERM); accelerate's launcher reports any failed child as 1
    proc = run_script(["--output_dir", str(parts), "--simulate_interrupt_at_step", "4", *common], expect=1)
    assert "Stopped at step 4; resume with --resume_from_checkpoint latest" in proc.stdout + proc.stderr
    assert (parts / "checkpoint-4").is_dir() and not list(parts.glob(".checkpoint-*"))
    assert not (parts / "pytorch_lora_weights.safetensors").exists()
    # the cosine schedule spans the 6 steps: a longer resume would bring the learning rate back
    err = cli_error(["--output_dir", str(parts), *common, "--resume_from_checkpoint", "latest", "--max_train_steps", "8"],
                    capsys)
    assert "--max_train_steps 8 differs from the 6 steps" in err and "--lr_scheduler cosine" in err
    assert json.loads((parts / "reslora_run.json").read_text())["schedule_steps"] == 6
    run_script(["--output_dir", str(parts), "--resume_from_checkpoint", "latest", *common])
    a = load_file(str(full / "reslora_training_state.safetensors"))
    b = load_file(str(parts / "reslora_training_state.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("norm_window") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    counts = [json.loads((d / "reslora_training_state.json").read_text())["norm_counts"] for d in (full, parts)]
    assert counts[0] == counts[1]


def test_calibration_halves_use_different_images_and_spread_timesteps():
    """Stub components carry each example's index through to the text embeddings, so the test sees which
    images each half used; example 2 is unreadable and must be passed over."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    dataset = [{"bad_index": i} if i == 2 else {"pixel_values": torch.full((3, 8, 8), float(i)),
                                                  "input_ids": torch.tensor([i])} for i in range(40)]
    vae = SimpleNamespace(
        config=SimpleNamespace(scaling_factor=1.0),
        encode=lambda px: SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator: px[:, :1])),
    )
    text_encoder = lambda ids, return_dict: (ids.float()[:, :, None],)  # noqa: E731
    args = SimpleNamespace(seed=0, train_batch_size=8, calibration_batches=4)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    batches, text_batches = train.build_calibration(args, dataset, vae, text_encoder,
                                                    DDPMScheduler(num_train_timesteps=1000), accelerator, torch.float32)
    assert [b[0].flatten().tolist() for b in text_batches] == [h.flatten().long().tolist() for _, _, h in batches]
    fit, held_out = batches[:2], batches[2:]  # split_calibration's halves
    used = [sorted(int(h) for _, _, hidden in half for h in hidden.flatten()) for half in (fit, held_out)]
    assert used == [[0, 1, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    expected = [int((j + 0.5) * 1000 / 8) for j in range(8)]  # stratified over the whole range, per half
    for half in (fit, held_out):
        assert sorted(int(t) for _, ts, _ in half for t in ts) == expected
        assert [t.tolist() for _, t, _ in half] == [expected[0::2], expected[1::2]]  # each batch spans the range


def test_merge_at_resumes_across_the_switch(tmp_path):
    """merge_at 0.5 of 6 steps merges in place after step 3. One run is stopped at step 2 (before the
    switch), resumed and stopped again at step 4 (after it), resumed to the end: it must match a run
    that was never stopped, and never merge twice."""
    common = ["--reslora_structure", "ms", "--pre_num", "-1", "--merge_at", "0.5", "--max_train_steps", "6",
              "--checkpointing_steps", "100", "--sample_steps", "100", "--train_batch_size", "4",
              "--pokemon_style_size", "12", "--sample_num_inference_steps", "1", "--report_to", "none",
              "--calibration_batches", "2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_script(["--output_dir", str(full), *common])
    run_script(["--output_dir", str(parts), "--simulate_interrupt_at_step", "2", *common], expect=1)
    state = json.loads((parts / "checkpoint-2" / "reslora_training_state.json").read_text())
    assert not state["shortcuts_merged"] and state["shortcut_scale"] == 1.0
    run_script(["--output_dir", str(parts), "--resume_from_checkpoint", "latest", "--simulate_interrupt_at_step", "4",
                *common], expect=1)
    state = json.loads((parts / "checkpoint-4" / "reslora_training_state.json").read_text())
    assert state["shortcuts_merged"] and state["shortcut_scale"] == 0.0
    run_script(["--output_dir", str(parts), "--resume_from_checkpoint", "latest", *common])
    a = load_file(str(full / "reslora_training_state.safetensors"))
    b = load_file(str(parts / "reslora_training_state.safetensors"))
    for key in (k for k in a if k.endswith(("lora_A", "lora_B"))):
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    for run_dir in (full, parts):
        report = json.loads((run_dir / "merge_report.json").read_text())
        assert report["method"] == "exact" and report["held_out"]["relative_output_error"] < 1e-6
    assert json.loads((full / "merge_report.json").read_text())["merge_at_report"]["method"] == "ls"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_script(
        ["--output_dir", str(tmp_path), "--learning_rate", "1e30", "--max_train_steps", "8", "--checkpointing_steps",
         "1", "--sample_steps", "100", "--train_batch_size", "2", "--pokemon_style_size", "8",
         "--sample_num_inference_steps", "1", "--report_to", "none", "--max_grad_norm", "0"],
        expect=1,
    )
    assert "Non-finite loss" in proc.stdout + proc.stderr
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints
    state = load_file(str(checkpoints[-1] / "reslora_training_state.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


# ------------------------------------------------------------------------------- bad inputs
def cli_error(argv, capsys):
    code = train.cli(argv)
    assert code == 2
    return capsys.readouterr().err


def make_imagefolder(path, column="text", corrupt=False):
    path.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (40, 40), (40 * i, 90, 160)).save(path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", column: f"a creature {i}"})
    if corrupt:
        (path / "broken.png").write_bytes(b"this is not a png")
        rows.append({"file_name": "broken.png", column: "broken"})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_row_without_a_caption_is_named_before_training(tmp_path, capsys, monkeypatch):
    folder = make_imagefolder(tmp_path / "data")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"file_name": "1.png"})  # no caption
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("the models were loaded before the data was checked"))
    err = cli_error(["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    assert "The caption of row 1 (column 'text') is None, not text" in err and "--caption_column" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == [".reslora.lock"]  # nothing but the run's lock


def test_missing_caption_column_lists_the_columns(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "data", column="caption")
    err = cli_error(["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    assert "--caption_column 'text' is not a column" in err and "caption" in err and "image" in err


def test_proportion_empty_prompts_blanks_that_share_of_captions_reproducibly(capsys):
    from transformers import CLIPTokenizer

    from reslora_diffusers.demo.tiny_sd2 import TINY_BASE_PATH
    from reslora_diffusers.integrations.sd_training import ImageCaptionDataset

    tokenizer = CLIPTokenizer.from_pretrained(TINY_BASE_PATH, subfolder="tokenizer")
    empty = tokenizer("", max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids[0]
    rows = [{"image": Image.new("RGB", (16, 16), (200, 90, 40)), "text": f"a pink creature number {i}"} for i in range(400)]

    def blanked(p, seed=0, epoch=0):
        args = train.parse_args(["--proportion_empty_prompts", str(p), "--seed", str(seed), "--resolution", "16"])
        dataset = ImageCaptionDataset(rows, args, tokenizer)
        dataset.use_epoch(epoch)
        return [bool(torch.equal(dataset[i]["input_ids"], empty)) for i in range(len(rows))]

    assert not any(blanked(0.0)) and all(blanked(1.0))
    quarter = blanked(0.25)
    assert 0.18 < np.mean(quarter) < 0.32  # 400 Bernoulli(0.25) draws: about ±3 standard deviations
    assert quarter == blanked(0.25)  # the same for (seed, epoch, index), so a resumed run blanks the same ones
    assert quarter != blanked(0.25, epoch=1) and quarter != blanked(0.25, seed=1)
    assert "--proportion_empty_prompts 1.5 must be in [0, 1]" in cli_error(["--proportion_empty_prompts", "1.5"], capsys)
    # runs recorded before the flag existed (no key in their record) still resume at its default, and only there
    assert "proportion_empty_prompts" not in train.run_config(train.parse_args([]))
    assert train.run_config(train.parse_args(["--proportion_empty_prompts", "0.1"]))["proportion_empty_prompts"] == 0.1


def test_model_path_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    err = cli_error(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "o")], capsys)
    assert "not a diffusers Stable Diffusion pipeline" in err


def test_unknown_alias_structure_and_pre_num(tmp_path, capsys):
    assert "Unknown dataset alias 'pokemon'" in cli_error(["--dataset", "pokemon"], capsys)
    err = cli_error(["--train_data_dir", str(tmp_path), "--dataset_name", "owner/other"], capsys)
    assert "--dataset_name and --train_data_dir both name the training data; pass only one" in err
    assert "Unknown ResLoRA structure 'xs'" in cli_error(["--reslora_structure", "xs"], capsys)
    assert "pre_num=-2 is invalid" in cli_error(["--pre_num", "-2"], capsys)
    assert "shortcut_decay=(0.9, 0.5) is invalid" in cli_error(["--shortcut_decay", "0.9", "0.5"], capsys)
    assert "merge_at applies to 'is' and 'ms'" in cli_error(["--reslora_structure", "bs", "--merge_at", "0.5"], capsys)
    assert "Unknown --merge 'avg'" in cli_error(["--merge", "avg"], capsys)


def test_hub_ids_without_hub_access_point_to_offline_choices(tmp_path, capsys):
    err = cli_error(["--dataset", "naruto-blip-captions", "--output_dir", str(tmp_path / "o")], capsys)
    assert "Could not load dataset 'lambdalabs/naruto-blip-captions'" in err and "pokemon-style" in err
    err = cli_error(
        ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-2", "--output_dir", str(tmp_path / "o")], capsys
    )
    assert "Could not load a diffusers Stable Diffusion pipeline" in err and "embedded tiny base" in err


def test_corrupt_image_fails_clearly_or_is_skipped(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "data", corrupt=True)
    err = cli_error(["--train_data_dir", str(folder), "--on_bad_image", "error", "--output_dir", str(tmp_path / "o")], capsys)
    assert "1 unreadable image(s)" in err and "#3" in err
    # batch size 1: the broken image's batch is a whole batch, which must still be a step (4 examples, 4 steps)
    proc = run_script(
        ["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "skip"), "--max_train_steps", "4",
         "--train_batch_size", "1", "--sample_steps", "100", "--sample_num_inference_steps", "1", "--report_to", "none",
         "--calibration_batches", "1", "--rank", "4", "--no_shortcut_decay"]
    )
    assert "Skipped 1 unreadable image(s)" in proc.stdout + proc.stderr and "Done: 4 steps" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "skip" / "merge_report.json").read_text())["steps"] == 4


def test_epochs_count_the_batches_each_process_gets():
    """--num_train_epochs sets --max_train_steps from the batches one process sees (accelerate's own split)."""
    import math

    from accelerate.data_loader import prepare_data_loader

    for items, batch, processes, accumulation in [(12, 2, 2, 1), (13, 2, 2, 2), (7, 3, 2, 1), (20, 4, 1, 3), (9, 1, 4, 2)]:
        loader = torch.utils.data.DataLoader(range(items), batch_size=batch)
        shard = prepare_data_loader(loader, num_processes=processes, process_index=0, put_on_device=False)
        assert train.steps_per_epoch(len(loader), processes, accumulation) == math.ceil(len(shard) / accumulation)


def test_an_unreadable_image_is_replaced_by_the_next_readable_example():
    from types import SimpleNamespace

    from reslora_diffusers.integrations.sd_training import ImageCaptionDataset, collate

    images = [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(3)]
    rows = [{"image": images[0], "text": "a"}, {"image": {"bytes": b"not a png", "path": None}, "text": "b"},
            {"image": {"bytes": b"nor this", "path": None}, "text": "c"}, {"image": images[2], "text": "d"}]
    args = SimpleNamespace(seed=0, resolution=8, center_crop=False, random_flip=False, image_interpolation_mode="bilinear",
                           image_column="image", caption_column="text", proportion_empty_prompts=0.0)

    class Tokenizer:  # the first letter's code
        model_max_length = 1

        def __call__(self, text, **kwargs):
            return SimpleNamespace(input_ids=torch.tensor([[ord(text[0])]]))

    tokenizer = Tokenizer()
    data = ImageCaptionDataset(rows, args, tokenizer)
    red = lambda example: round(float((example["pixel_values"][0].mean() + 1) * 127.5))  # noqa: E731
    assert [red(data[i]) for i in range(4)] == [0, 120, 120, 120]  # rows 1 and 2 read as row 3
    assert [data[i].get("bad_index") for i in range(4)] == [None, 1, 2, None]
    assert data[1]["input_ids"].tolist() == [ord("d")]  # the stand-in's own caption
    batch = collate([data[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] == 4 and batch["bad_indices"] == [1, 2]
    rows[3]["image"] = {"bytes": b"broken too", "path": None}
    data = ImageCaptionDataset(rows, args, tokenizer)
    assert red(data[3]) == 0  # wraps around to row 0


def test_script_refuses_sharded_modes_before_training(monkeypatch, capsys):
    """The refusal itself is unit-tested in test_transformers_examples.py; here: the script calls it."""
    from reslora_diffusers.integrations import distributed

    def refuse(accelerator):
        raise distributed.UnsupportedDistributedMode("FSDP is not supported. Supported modes: single process")

    monkeypatch.setattr(distributed, "check_distributed_mode", refuse)  # reached through check_training_setup
    assert "Supported modes" in cli_error(["--report_to", "none"], capsys)


@pytest.mark.parametrize("structure", list(RUNS))
def test_run_ends_by_saying_how_far_the_export_is_from_the_trained_model(runs, structure):
    log = (runs[structure] / "launch.log").read_text()
    report = json.loads((runs[structure] / "merge_report.json").read_text())
    if report["method"] == "exact":
        assert "The export is exact" in log and "Warning" not in log
    else:
        held = report["held_out"]["relative_output_error"]
        assert f"UNet merge '{report['method']}': on held-out batches the export's UNet output differs from the trained " \
               f"model's by {100 * held:.1f}%." in log
        assert ("Warning: that is more than 5%" in log) == (held > 0.05)
        assert ("--shortcut_decay 0.3 0.8" in log) == (held > 0.05)


def test_embedded_base_defaults_to_rank_64_and_decayed_shortcuts(capsys):
    """On the embedded base, is/ms runs anneal their shortcuts (0.3, 0.8) at rank 64 unless told otherwise;
    a hub model keeps rank 4 and no decay."""
    def parsed(*argv):
        args = train.parse_args(list(argv))
        return args.rank, args.lora_alpha, args.reslora_config.shortcut_decay, args.reslora_config.merge_at

    assert parsed() == (64, 64.0, (0.3, 0.8), None)
    assert parsed("--reslora_structure", "ms") == (64, 64.0, (0.3, 0.8), None)
    assert parsed("--no_shortcut_decay") == (64, 64.0, None, None)
    assert parsed("--merge_at", "0.6") == (64, 64.0, None, 0.6)
    assert parsed("--reslora_structure", "bs")[2] is None and parsed("--reslora_structure", "none")[2] is None
    assert parsed("--rank", "8", "--shortcut_decay", "0.5", "0.9") == (8, 8.0, (0.5, 0.9), None)
    assert parsed("--pretrained_model_name_or_path", "owner/sd2") == (4, 4.0, None, None)
    err = cli_error(["--no_shortcut_decay", "--shortcut_decay", "0.3", "0.8"], capsys)
    assert "--no_shortcut_decay and --shortcut_decay contradict" in err
    # --no_shortcut_decay is recorded through --shortcut_decay only, so runs recorded before it existed (rank 4, no
    # decay) resume with --rank 4 --no_shortcut_decay, and hub runs with no flag at all
    record = lambda *argv: train.run_config(train.parse_args(list(argv)))  # noqa: E731
    assert "no_shortcut_decay" not in record() and "no_shortcut_decay" not in record("--no_shortcut_decay")
    assert (record()["shortcut_decay"], record("--no_shortcut_decay")["shortcut_decay"]) == ([0.3, 0.8], None)
    assert record("--rank", "4", "--no_shortcut_decay")["rank"] == 4
    # snapshots show the trained model exactly when the export will be it
    view = lambda *argv: train.parse_args(list(argv)).sample_view  # noqa: E731
    assert view() == view("--merge_at", "0.6") == view("--pretrained_model_name_or_path", "o/sd2", "--merge_at", "0.5") == "trained"
    assert view("--no_shortcut_decay") == view("--reslora_structure", "bs") == view("--pretrained_model_name_or_path", "o/sd2") == "merged"
    assert view("--sample_view", "merged") == "merged"


def test_a_pushed_runs_card_loads_the_lora_from_the_hub(tmp_path):
    from reslora_diffusers.integrations.sd_run import model_card

    args = train.parse_args(["--output_dir", str(tmp_path / "run"), "--push_to_hub", "--hub_model_id", "me/creatures"])
    files = {"files": ["pytorch_lora_weights.safetensors"]}
    card = model_card(str(tmp_path / "run"), {**train.run_card(args, "base", "me/creatures"), **files})
    assert 'pipe.load_lora_weights("me/creatures", weight_name="pytorch_lora_weights.safetensors")' in card
    card = model_card(str(tmp_path / "run"), {**train.run_card(args, "base"), **files})  # not pushed: the folder
    assert f'pipe.load_lora_weights("{tmp_path / "run"}", weight_name=' in card


def test_the_cards_snippet_samples_with_the_grids_settings(tmp_path):
    from reslora_diffusers.integrations.sd_run import model_card

    args = train.parse_args(["--output_dir", str(tmp_path / "run"), "--sample_guidance_scale", "3.5",
                             "--sample_num_inference_steps", "12", "--resolution", "48"])
    files = {"files": ["pytorch_lora_weights.safetensors"]}
    card = model_card(str(tmp_path / "run"), {**train.run_card(args, "base"), **files})
    call = card[card.index("image = pipe("):card.index(".images[0]")]
    for setting in ("num_inference_steps=12", "guidance_scale=3.5", "height=48", "width=48",
                    "generator=torch.Generator().manual_seed(0)"):
        assert setting in call
    # a card re-written from a training state recorded before sample_settings: the plain call, still valid
    old = {k: v for k, v in train.run_card(args, "base").items() if k != "sample_settings"}
    card = model_card(str(tmp_path / "run"), {**old, **files})
    assert f'image = pipe("{old["example_prompt"]}").images[0]' in card
    # a prompt with quotes and a Windows path stay valid Python, with the values the run used
    args = train.parse_args(["--output_dir", "C:\\runs\\new", "--validation_prompt", 'a "cute" dragon'])
    card = model_card(args.output_dir, {**train.run_card(args, "base"), **files})
    tree = ast.parse(re.search(r"```python\n(.*?)```", card, re.S).group(1))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    called = lambda name: next(c for c in calls if getattr(c.func, "attr", getattr(c.func, "id", None)) == name)  # noqa: E731
    assert ast.literal_eval(called("load_lora_weights").args[0]) == "C:\\runs\\new"
    assert ast.literal_eval(called("pipe").args[0]) == 'a "cute" dragon'


def test_hub_token_is_never_recorded_and_old_records_holding_it_still_resume(tmp_path):
    from reslora_diffusers.integrations.run_dir import RunDirError, check_ownership, write_run_record

    args = train.parse_args(["--push_to_hub", "--hub_token", "hf_SECRET", "--hub_model_id", "me/creatures"])
    config = train.run_config(args)
    assert not {"hub_token", "push_to_hub", "hub_model_id"} & set(config)
    assert "hub_token" not in train.tracker_config(args) and train.tracker_config(args)["rank"] == 64
    # a record written before: it holds the token and the hub flags; resuming compares neither, nor prints them
    write_run_record(str(tmp_path), {**config, "hub_token": "hf_OLD", "push_to_hub": True, "hub_model_id": None}, None)
    ignored = train.OPERATIONAL_FLAGS | train.RESOLVED_FLAGS
    check_ownership(str(tmp_path), config, resume=True, overwrite=False, finished=False, ignored=ignored)
    with pytest.raises(RunDirError) as err:
        check_ownership(str(tmp_path), {**config, "rank": 8}, resume=True, overwrite=False, finished=False, ignored=ignored)
    assert "--rank 64 (saved) vs 8 (now)" in str(err.value) and "hf_OLD" not in str(err.value)


def test_a_resume_may_change_max_train_steps_only_when_no_schedule_spans_the_run(tmp_path):
    from reslora_diffusers.integrations.run_dir import RunDirError, check_schedule_steps, write_run_record

    spans = lambda *argv: train.run_length_schedules(train.parse_args(list(argv)))  # noqa: E731
    assert spans(*QUICK) == [] and spans(*QUICK, "--lr_scheduler", "constant_with_warmup") == []
    assert spans() == ["--shortcut_decay"]  # the embedded default anneals its shortcuts
    assert spans(*QUICK, "--lr_scheduler", "cosine") == ["--lr_scheduler cosine"]
    assert spans(*QUICK, "--merge_at", "0.5") == ["--merge_at"]
    write_run_record(str(tmp_path), {"seed": 0}, None)  # a record from before schedule_steps: not checked
    check_schedule_steps(str(tmp_path), 8, ["--shortcut_decay"])
    write_run_record(str(tmp_path), {"seed": 0}, None, schedule_steps=4)
    check_schedule_steps(str(tmp_path), 4, ["--shortcut_decay"])
    check_schedule_steps(str(tmp_path), 8, [])
    with pytest.raises(RunDirError, match=r"--max_train_steps 8 differs from the 4 steps .* --shortcut_decay span"):
        check_schedule_steps(str(tmp_path), 8, ["--shortcut_decay"])


def test_cpu_contention_warning_only_when_other_work_fills_the_cores():
    assert train.cpu_contention_warning(load=0.1, cores=2, threads=2) is None  # an idle machine
    assert train.cpu_contention_warning(load=2.0, cores=2, threads=1) is None  # OMP_NUM_THREADS=1 already
    assert train.cpu_contention_warning(load=1.0, cores=8, threads=4) is None  # room to spare
    busy = train.cpu_contention_warning(load=1.0, cores=2, threads=2)  # another 1-thread job beside 2 threads
    assert "load average 1.0 on 2 cores" in busy and "OMP_NUM_THREADS=1" in busy


def test_merge_summary_warns_only_above_the_threshold():
    far = train.merge_summary({"method": "ls", "held_out": {"relative_output_error": 0.25}})
    near = train.merge_summary({"method": "ls", "held_out": {"relative_output_error": 0.01}})
    assert "25.0%" in far and "Warning" in far and "--shortcut_decay" in far
    assert "1.0%" in near and "Warning" not in near
    assert "exact" in train.merge_summary({"method": "exact", "held_out": {"relative_output_error": 0.0}})
    unmeasured = train.merge_summary({"method": "ls"})  # an approximate merge with no error measured is not exact
    assert "not measured" in unmeasured and "exact" not in unmeasured
    # --train_text_encoder: the text encoder's merge is reported too, and a far one warns on its own
    exact = {"method": "exact", "held_out": {"relative_output_error": 0.0}}
    text_far = train.merge_summary({**exact, "text_encoder": {"method": "ls", "held_out": {"relative_output_error": 0.3}}})
    assert "UNet export is exact" in text_far and "text encoder" in text_far and "30.0%" in text_far and "Warning" in text_far
    text_near = train.merge_summary({"method": "ls", "held_out": {"relative_output_error": 0.02},
                                     "text_encoder": {"method": "ls", "held_out": {"relative_output_error": 0.01}}})
    assert "2.0%" in text_near and "1.0%" in text_near and "Warning" not in text_near
    assert train.merge_summary({**exact, "text_encoder": exact}) == "The export is exact: it computes what was trained."


def test_quickstart_style_colour_sweep_loads_the_export_like_a_user(runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from benchmarks import quickstart_style
    from reslora_diffusers.demo.pokemon_style import COLOR_NAMES, pokemon_style_sample
    from reslora_diffusers.demo.style_score import fill_colour_match, style_score_image
    from reslora_diffusers.demo.tiny_sd2 import TINY_BASE_PATH

    run_dir = runs["none"]
    report = quickstart_style.main([str(run_dir), "--num_reference", "4", "--colour_sweep", "1",
                                    "--json", str(tmp_path / "r.json")])
    sweep = json.loads((tmp_path / "r.json").read_text())["colour_sweep"]
    assert sweep == json.loads(json.dumps(report["colour_sweep"]))
    assert sorted(sweep["base"]) == sorted(sweep["export"]) == sorted(COLOR_NAMES)
    # each prompt opens as the dataset's captions of that colour do ("an orange", not "a orange", which the
    # base never saw in training)
    openings = {tuple(caption.split()[:2]) for caption in (pokemon_style_sample(i, 0, 32)[1] for i in range(200))}
    for colour in COLOR_NAMES:
        words = sweep["prompts"][colour].split()
        assert words[1] == colour and tuple(words[:2]) in openings, sweep["prompts"][colour]
    # independently: the export's orange sample, generated here with stock diffusers and the same settings
    pipe = StableDiffusionPipeline.from_pretrained(TINY_BASE_PATH)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run_dir))
    image = pipe("an orange cartoon creature with big eyes and round ears", num_inference_steps=20,
                 guidance_scale=sweep["guidance"], height=report["resolution"], width=report["resolution"],
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert sweep["export"]["orange"]["kept"] == int(fill_colour_match(image, "orange")["match"])
    assert sweep["export"]["orange"]["came_back_as"] == {str(fill_colour_match(image, "orange")["nearest"]): 1}
    assert sweep["export"]["orange"]["style_mean"] == pytest.approx(style_score_image(image), abs=1e-6)
    assert sweep["export"]["orange"]["of"] == 1
