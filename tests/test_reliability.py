"""The training script never loses work or exports garbage (issue #15).

Launched runs share one finished run (checkpoints 2 and 4, 3 updates per epoch) and work on copies of it;
checkpoint mechanics are also tested in-process with a stand-in accelerator.
"""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_script import QUICK, cli_error, make_imagefolder, run_script, train

from reslora_diffusers.integrations import merge as merge_cli
from reslora_diffusers.integrations import sd_training
from reslora_diffusers.core.export import atomic_save_file, atomic_save_image, atomic_write_text
from reslora_diffusers.integrations.run_dir import (
    MANIFEST_NAME,
    RunDirError,
    acquire_lock,
    check_launch,
    latest_checkpoint,
    read_manifest,
    save_checkpoint,
    set_head,
    verify_checkpoint,
    write_run_record,
)
from reslora_diffusers.integrations.sd_run import export_complete

# 12 examples in batches of 4: 3 updates per epoch, so step 4 is not at an epoch end
RUN = [*QUICK, "--pokemon_style_size", "12"]
EXPORT = ["pytorch_lora_weights.safetensors", "merge_report.json", "README.md"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_script(["--output_dir", str(run_dir), *RUN])
    return run_dir


def copy_run(run_dir, tmp_path, name="copy"):
    return Path(shutil.copytree(run_dir, tmp_path / name, ignore=shutil.ignore_patterns(".reslora.lock")))


def file_digests(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def output(proc):
    return proc.stdout + proc.stderr


# --------------------------------------------------------------------------- 1. NaN after the step
def test_step_that_makes_weights_non_finite_stops_without_export(tmp_path):
    proc = run_script(["--output_dir", str(tmp_path), *QUICK, "--learning_rate", "1e2", "--max_train_steps", "3",
                       "--checkpointing_steps", "1", "--sample_steps", "100"], expect=1)
    assert "Non-finite loss" in output(proc) and "Done" not in output(proc)
    assert not any((tmp_path / name).exists() for name in EXPORT[:2])
    for checkpoint in tmp_path.glob("checkpoint-*"):
        state = load_file(str(checkpoint / "reslora_training_state.safetensors"))
        assert all(torch.isfinite(v).all() for v in state.values()), checkpoint


# ----------------------------------------------------------- 2, 6, 7. checkpoint writes, in-process
class StandInAccelerator:
    """What save_checkpoint uses of accelerate: one process that writes two files, or is killed while writing."""

    is_main_process = True

    def __init__(self, killed=False):
        self.killed = killed

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path)
        Path(path, "model.bin").write_bytes(os.urandom(256))
        if self.killed:
            raise KeyboardInterrupt
        Path(path, "optimizer.bin").write_bytes(os.urandom(512))


@pytest.fixture
def run_dir(tmp_path):
    write_run_record(str(tmp_path), {"seed": 0}, None)
    return tmp_path


def names(folder):
    return sorted(d.name for d in folder.glob("checkpoint-*"))


def test_kill_while_writing_keeps_the_previous_checkpoint(run_dir):
    save_checkpoint(StandInAccelerator(), str(run_dir), 2, limit=1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(StandInAccelerator(killed=True), str(run_dir), 4, limit=1)
    assert names(run_dir) == ["checkpoint-2"]
    assert latest_checkpoint(str(run_dir)) == run_dir / "checkpoint-2"


def test_latest_follows_the_trajectory_and_pruning_drops_abandoned_then_oldest(run_dir):
    for step in (2, 4, 6):
        save_checkpoint(StandInAccelerator(), str(run_dir), step, limit=3)
    write_run_record(str(run_dir), {"seed": 0}, "checkpoint-2")  # what a resume from checkpoint-2 records
    assert latest_checkpoint(str(run_dir)) == run_dir / "checkpoint-2"
    save_checkpoint(StandInAccelerator(), str(run_dir), 3, limit=3)
    assert latest_checkpoint(str(run_dir)) == run_dir / "checkpoint-3"
    assert names(run_dir) == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]  # 4: abandoned and older than 6
    save_checkpoint(StandInAccelerator(), str(run_dir), 5, limit=3)
    assert names(run_dir) == ["checkpoint-2", "checkpoint-3", "checkpoint-5"]
    save_checkpoint(StandInAccelerator(), str(run_dir), 7, limit=3)
    assert names(run_dir) == ["checkpoint-3", "checkpoint-5", "checkpoint-7"]  # the oldest write of the trajectory
    assert read_manifest(run_dir / "checkpoint-7")["parent"] == "checkpoint-5"


def test_resaving_a_step_replaces_it_atomically(run_dir, monkeypatch):
    save_checkpoint(StandInAccelerator(), str(run_dir), 2)
    real_rmtree = shutil.rmtree

    def rmtree_then_killed(path, *args, **kwargs):  # a kill right after any delete
        real_rmtree(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", rmtree_then_killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(StandInAccelerator(), str(run_dir), 2)
    monkeypatch.undo()
    assert verify_checkpoint(run_dir / "checkpoint-2")["step"] == 2
    assert latest_checkpoint(str(run_dir)) == run_dir / "checkpoint-2"


# -------------------------------------------------- 3, 6, 7. resume from an earlier step, resume at the end
def test_resume_from_earlier_checkpoint_then_at_the_end(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    proc = run_script(["--output_dir", str(run), *RUN, "--resume_from_checkpoint", str(run / "checkpoint-2"),
                       "--simulate_interrupt_at_step", "3"], expect=1)
    assert "Stopped at step 3" in output(proc)
    assert not export_complete(str(run))  # the old export is not this trajectory's end
    assert latest_checkpoint(str(run)) == run / "checkpoint-3"  # not the abandoned checkpoint-4
    assert read_manifest(run / "checkpoint-3")["parent"] == "checkpoint-2"

    proc = run_script(["--output_dir", str(run), *RUN, "--resume_from_checkpoint", "latest"])
    assert "Done: 4 steps" in output(proc)
    assert read_manifest(run / "checkpoint-4")["parent"] == "checkpoint-3"  # re-saved in this trajectory
    a, b = (load_file(str(d / "reslora_training_state.safetensors")) for d in (finished, run))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)

    before = file_digests(run)
    proc = run_script(["--output_dir", str(run), *RUN, "--resume_from_checkpoint", "latest"])
    assert "nothing to do" in output(proc) and "Done" not in output(proc)
    after = file_digests(run)
    assert {k: v for k, v in after.items() if k != ".reslora.lock"} == {k: v for k, v in before.items() if k != ".reslora.lock"}


def test_resume_at_the_end_without_export_exports_once(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    for name in EXPORT[:2]:
        (run / name).unlink()
    proc = run_script(["--output_dir", str(run), *RUN, "--resume_from_checkpoint", "latest"])
    assert "Done: 4 steps" in output(proc)
    assert (run / EXPORT[0]).read_bytes() == (finished / EXPORT[0]).read_bytes()
    assert json.loads((run / EXPORT[1]).read_text())["steps"] == 4


# ----------------------------------------------------------------------------- 4, 5. the output dir
def test_finished_or_other_run_is_refused_and_nothing_is_written(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = file_digests(run)
    err = cli_error(["--output_dir", str(run), *RUN], capsys)
    assert "already holds a finished run" in err and "--overwrite_output_dir" in err
    err = cli_error(["--output_dir", str(run), *RUN, "--rank", "8", "--resume_from_checkpoint", "latest"], capsys)
    assert "another configuration" in err and "--rank 4 (saved) vs 8 (now)" in err
    assert "--resume_from_checkpoint missing" in cli_error(["--output_dir", str(run), "--resume_from_checkpoint", "missing"], capsys)
    assert "--resolution 60 is not a multiple of 8" in cli_error(["--output_dir", str(run), "--resolution", "60"], capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(2):
        (corrupt / f"{i}.png").write_bytes(b"not a png")
    (corrupt / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n" for i in range(2)))
    err = cli_error(["--output_dir", str(run), *RUN, "--train_data_dir", str(corrupt), "--overwrite_output_dir"], capsys)
    assert "No image of the dataset could be read" in err
    assert {k: v for k, v in file_digests(run).items() if k != ".reslora.lock"} == before


def test_a_checkpoint_of_another_run_folder_is_checked_against_that_run(finished, tmp_path, capsys):
    other = tmp_path / "other"
    argv = ["--output_dir", str(other), *RUN, "--resume_from_checkpoint", str(finished / "checkpoint-2")]
    err = cli_error([*argv, "--rank", "8"], capsys)
    assert "--resume_from_checkpoint's run folder" in err and "--rank 4 (saved) vs 8 (now)" in err
    assert [p.name for p in other.iterdir()] == [".reslora.lock"]  # refused before anything was written
    assert json.loads((finished / "reslora_run.json").read_text())["launch"] == {"mixed_precision": "no", "num_processes": 1}


def test_a_resume_under_another_launch_is_refused(tmp_path):
    launch = {"mixed_precision": "no", "num_processes": 1}
    write_run_record(str(tmp_path), {"seed": 0}, None)  # recorded before launch settings: not checked
    check_launch(str(tmp_path), {"mixed_precision": "bf16", "num_processes": 2})
    write_run_record(str(tmp_path), {"seed": 0}, None, launch=launch)
    check_launch(str(tmp_path), dict(launch))
    for now in ({"mixed_precision": "bf16", "num_processes": 1}, {"mixed_precision": "no", "num_processes": 2}):
        with pytest.raises(RunDirError, match="launched with other settings") as err:
            check_launch(str(tmp_path), now)
        assert "accelerate launch --mixed_precision no --num_processes 1" in str(err.value)
    set_head(str(tmp_path), "checkpoint-2")  # moving the head keeps the launch record
    assert json.loads((tmp_path / "reslora_run.json").read_text())["launch"] == launch


def test_second_run_in_a_locked_dir_is_refused(tmp_path, capsys):
    lock = acquire_lock(str(tmp_path))
    try:
        err = cli_error(["--output_dir", str(tmp_path), *RUN], capsys)
    finally:
        lock.close()
    assert "in use by another training run" in err


def test_overwrite_replaces_the_old_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    run_script(["--output_dir", str(run), *RUN, "--max_train_steps", "1", "--sample_steps", "1", "--checkpointing_steps", "1",
                "--overwrite_output_dir"])
    assert names(run) == ["checkpoint-1"]
    # the old run's snapshots are gone: this run's two, and the samples of its exported file
    assert sorted(d.name for d in (run / "samples").iterdir()) == ["export", "step-000000", "step-000001"]
    assert json.loads((run / "merge_report.json").read_text())["steps"] == 1


# -------------------------------------------------------------------------------- 8. corrupt checkpoints
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_named_and_the_previous_one_offered(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    target = run / "checkpoint-4" / "reslora_training_state.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    target.write_bytes(bytes(data) if damage == "flip" else bytes(data[: len(data) // 2]))
    err = cli_error(["--output_dir", str(run), *RUN, "--resume_from_checkpoint", "latest"], capsys)
    assert str(target) in err and ("corrupt" if damage == "flip" else "truncated") in err
    assert f"--resume_from_checkpoint {run / 'checkpoint-2'}" in err
    assert json.loads((run / "checkpoint-2" / MANIFEST_NAME).read_text())["step"] == 2


# -------------------------------------------------------------------------------------- 9. bad values
@pytest.mark.parametrize("flag,value", [
    ("--resolution", "0"), ("--checkpointing_steps", "0"), ("--sample_steps", "0"), ("--gradient_accumulation_steps", "0"),
    ("--max_train_samples", "0"), ("--sample_num_inference_steps", "0"), ("--num_validation_images", "0"),
    ("--calibration_batches", "0"), ("--train_batch_size", "0"), ("--learning_rate", "-1"), ("--max_train_steps", "0"),
    ("--validation_epochs", "-1"), ("--validation_epochs", "0"),
])
def test_bad_value_is_refused_naming_the_flag(flag, value, tmp_path):
    with pytest.raises(train.TrainingError, match=f"{flag} {value}(\\.0)? must be greater than 0"):
        train.parse_args([flag, value, "--output_dir", str(tmp_path / "o")])


def test_output_dir_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(train.TrainingError, match="cannot be written"):
        train.parse_args(["--output_dir", str(tmp_path / "file" / "out")])


def test_16_bit_image_keeps_its_brightness(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = np.asarray(sd_training.open_image(str(tmp_path / "grey16.png")))
    assert pixels.shape == (8, 8, 3) and np.all(np.abs(pixels.astype(int) - 128) <= 1)


def test_malformed_metadata_names_file_and_line(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "data")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-3]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    err = cli_error(["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    assert f"{folder / 'metadata.jsonl'} line 2 is not valid JSON" in err


# ------------------------------------------------------------------------------------- 10. merge CLI
def test_remerge_writes_a_consistent_set_and_refuses_checkpoints(finished, tmp_path, capsys):
    import hashlib

    run = copy_run(finished, tmp_path)
    assert merge_cli.main([str(run), "--merge", "no"]) == 0
    report = json.loads((run / "merge_report.json").read_text())
    assert report["method"] == "no"
    assert report["lora_sha256"][EXPORT[0]] == hashlib.sha256((run / EXPORT[0]).read_bytes()).hexdigest()
    card = (run / "README.md").read_text()
    assert "| merge | no |" in card and f"{report['held_out']['relative_output_error']:.3g}" in card
    assert "| steps | 4 |" in card
    assert "ComfyUI / AUTOMATIC1111: put `pytorch_lora_weights_kohya.safetensors`" in (finished / "README.md").read_text()
    assert "ComfyUI / AUTOMATIC1111" in card  # both formats, so the card names the kohya file
    # a narrower format: the other format's old file goes, and the card stops pointing to it
    assert merge_cli.main([str(run), "--merge", "ls", "--export_format", "diffusers"]) == 0
    assert not (run / "pytorch_lora_weights_kohya.safetensors").exists() and (run / EXPORT[0]).exists()
    assert "ComfyUI" not in (run / "README.md").read_text() and export_complete(str(run))
    capsys.readouterr()

    checkpoint = run / "checkpoint-4"
    before = file_digests(checkpoint)
    assert merge_cli.main([str(checkpoint), "--merge", "ls"]) == 2
    assert "is a training checkpoint" in capsys.readouterr().err and file_digests(checkpoint) == before

    # weights of another save beside this JSON (a save stopped between the two files): named, not loaded
    good = (run / "reslora_training_state.safetensors").read_bytes()
    shutil.copy(run / "checkpoint-2" / "reslora_training_state.safetensors", run / "reslora_training_state.safetensors")
    assert merge_cli.main([str(run), "--merge", "ls"]) == 2
    assert "is not the file that reslora_training_state.json beside it was saved with" in capsys.readouterr().err
    (run / "reslora_training_state.safetensors").write_bytes(good)

    (run / "reslora_training_state.json").write_text('{"format": "reslora-tr')
    assert merge_cli.main([str(run), "--merge", "ls"]) == 2
    assert f"{run / 'reslora_training_state.json'}: not a readable JSON file" in capsys.readouterr().err



def test_progress_grid_leaves_out_a_snapshot_it_cannot_read(tmp_path):
    """A sample truncated by a crash (before sample writes were atomic) must not stop the next grid."""
    from reslora_diffusers.demo.grids import make_grid

    prompts, columns = ["a", "b"], {"step-000000": 10, "step-000002": 90, "export": 170}
    for name, shade in columns.items():
        (tmp_path / "samples" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (shade + i, 0, 0)).save(tmp_path / "samples" / name / f"prompt-{i:02d}_seed-0.png")
    broken = tmp_path / "samples" / "step-000002" / "prompt-01_seed-0.png"
    broken.write_bytes(broken.read_bytes()[:20])
    grid, unreadable = train.draw_progress_grid(tmp_path / "samples", prompts, 0, tmp_path / "progress_grid.png")
    assert unreadable == ["step-000002"]
    expected = make_grid([[Image.new("RGB", (8, 8), (shade + i, 0, 0)) for shade in (10, 170)] for i in range(2)],
                         row_labels=prompts, col_labels=["step 0", "export"])
    assert np.array_equal(np.asarray(grid), np.asarray(expected))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "progress_grid.png").convert("RGB")), np.asarray(expected))


# ------------------------------------------------------------------------------------ 11. file modes
def test_exported_files_follow_the_umask(finished, tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text("x", str(tmp_path / "a.txt"))
        atomic_save_file({"t": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
        atomic_save_image(Image.new("RGB", (4, 4)), str(tmp_path / "c.png"))
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.safetensors", "c.png"]  # no temporary file left
    for name in ("a.txt", "b.safetensors", "c.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    lora = stat.S_IMODE((finished / EXPORT[0]).stat().st_mode)
    assert lora == 0o666 & ~old  # the launched run inherited the test's umask
