"""The output dir of a training run: who owns it, and its checkpoints.

- A lock file, held for the run, refuses a second run in the same dir.
- ``reslora_run.json`` records the run's configuration and ``head``, the newest checkpoint of the
  current trajectory (the one resumed from, or the last one written).
- Each ``checkpoint-N`` holds ``reslora_checkpoint.json``: its step, write sequence number, parent
  checkpoint and the size and SHA-256 of every file. A checkpoint is written to a temporary folder,
  given its manifest, then renamed; only then are old checkpoints pruned.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import shutil
from pathlib import Path

from ..core.export import atomic_write_text, file_sha256, read_json

RUN_RECORD_NAME = "reslora_run.json"
LOCK_NAME = ".reslora.lock"
MANIFEST_NAME = "reslora_checkpoint.json"
logger = logging.getLogger(__name__)
# what a run writes into its output dir (replaced by --overwrite_output_dir)
RUN_OUTPUTS = [
    RUN_RECORD_NAME, "checkpoint-*", ".checkpoint-*", "samples", "progress_grid.png", "pytorch_lora_weights.safetensors",
    "merge_report.json", "reslora_training_state.*", "reslora_calibration.safetensors", "README.md", ".export-*",
]


class RunDirError(RuntimeError):
    """The output dir or a checkpoint in it cannot be used; the message says why and what to do."""


# ----------------------------------------------------------------------------------- ownership
def acquire_lock(output_dir: str):
    """Hold an exclusive lock on ``output_dir`` until the returned file is closed (or the process ends)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirError(
            f"{output_dir} is in use by another training run (it holds the lock {path}). Wait for that run to "
            "end, or pass another --output_dir."
        ) from None
    return handle


def read_run_record(output_dir: str):
    path = os.path.join(output_dir, RUN_RECORD_NAME)
    return read_json(path) if os.path.exists(path) else None


def write_run_record(output_dir: str, config: dict, head, schedule_steps=None, launch=None):
    """The run's configuration, its trajectory head, how it was launched (``launch``: mixed precision and process
    count) and, when a schedule spans the run, the steps it spans (``schedule_steps``)."""
    record = {"config": config, "head": head}
    for key, value in (("schedule_steps", schedule_steps), ("launch", launch)):
        if value is not None:
            record[key] = value
    atomic_write_text(json.dumps(record, indent=2, sort_keys=True), os.path.join(output_dir, RUN_RECORD_NAME))


def set_head(output_dir: str, head):
    record = read_run_record(output_dir)
    write_run_record(output_dir, record["config"], head, record.get("schedule_steps"), record.get("launch"))


def check_schedule_steps(record_dir: str, steps: int, schedules: list[str]):
    """Refuse to resume a run whose schedules span another number of steps (``schedules``: the flags that span
    the run; empty when none does). Records without ``schedule_steps`` are not checked."""
    saved = (read_run_record(record_dir) or {}).get("schedule_steps")
    if saved is None or saved == steps or not schedules:
        return
    raise RunDirError(
        f"--max_train_steps {steps} differs from the {saved} steps the run in {record_dir} was started with, and "
        f"{' and '.join(schedules)} span the whole run: resuming with another length would move them (the learning "
        f"rate or the shortcut weight would jump back). Resume with --max_train_steps {saved}, or train the longer "
        "schedule as a new run (--overwrite_output_dir or another --output_dir)."
    )


def check_launch(record_dir: str, launch: dict):
    """Refuse to resume a run launched with another mixed precision or process count (they change what a step
    computes: the numerics, or the global batch). Records without ``launch`` are not checked."""
    saved = (read_run_record(record_dir) or {}).get("launch")
    if not saved:
        return
    changed = [f"{k} {saved.get(k)!r} (saved) vs {launch.get(k)!r} (now)" for k in sorted(set(saved) | set(launch))
               if saved.get(k) != launch.get(k)]
    if changed:
        raise RunDirError(
            f"The run in {record_dir} was launched with other settings: {'; '.join(changed)}. Resume it with "
            f"`accelerate launch --mixed_precision {saved.get('mixed_precision')} --num_processes "
            f"{saved.get('num_processes')} ...` (a step would compute something else), or start a new run."
        )


def check_config(record_dir: str, config: dict, ignored=frozenset(), what: str = "--output_dir"):
    """Refuse when the run recorded in ``record_dir`` has another configuration than ``config`` (keys in ``ignored``
    are not compared, and never printed: a record written before they left the record may hold them)."""
    record = read_run_record(record_dir)  # None where there is no record (or no folder)
    if record is None:
        return
    config = json.loads(json.dumps(config))
    saved = {k: v for k, v in record.get("config", {}).items() if k not in ignored}
    changed = [f"--{k} {saved.get(k)!r} (saved) vs {config.get(k)!r} (now)" for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    if changed:
        raise RunDirError(
            f"{what} {record_dir} holds a run with another configuration: {'; '.join(changed)}. Resume with the "
            "run's flags, or pass --overwrite_output_dir to replace it."
        )


def run_outputs(output_dir: str) -> list[str]:
    return sorted({p for pattern in RUN_OUTPUTS for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))})


def check_ownership(output_dir: str, config: dict, resume: bool, overwrite: bool, finished: bool, ignored=frozenset()):
    """Refuse to write into a dir that holds another run, or this run with another configuration. Keys in
    ``ignored`` are not compared (and never printed): a record written before they left the record may hold them."""
    if overwrite or not os.path.isdir(output_dir):
        return
    record = read_run_record(output_dir)
    if record is None:
        leftovers = [os.path.basename(p) for p in run_outputs(output_dir) if os.path.basename(p) != "README.md"]  # a card alone may be the user's
        if leftovers:
            raise RunDirError(
                f"--output_dir {output_dir} holds files of another run ({', '.join(leftovers[:5])}) without its "
                f"{RUN_RECORD_NAME}. Pass --overwrite_output_dir to replace them, or choose another --output_dir."
            )
        return
    if not resume:
        raise RunDirError(
            f"--output_dir {output_dir} already holds a {'finished' if finished else 'unfinished'} run. Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another --output_dir."
        )
    check_config(output_dir, config, ignored)


def clear_run_outputs(output_dir: str):
    """Remove what an earlier run wrote (only the names a run writes; other files stay)."""
    for path in run_outputs(output_dir):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# --------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir) -> list[Path]:
    dirs = [d for d in Path(output_dir).glob("checkpoint-*") if d.is_dir() and d.name.split("-")[1].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def read_manifest(checkpoint: Path):
    try:
        return read_json(str(checkpoint / MANIFEST_NAME))
    except ValueError:
        return None


def write_manifest(checkpoint: Path, step: int, sequence: int, parent):
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {
        "step": step, "sequence": sequence, "parent": parent,
        "files": {f: {"size": (checkpoint / f).stat().st_size, "sha256": file_sha256(checkpoint / f)} for f in files},
    }
    atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True), str(checkpoint / MANIFEST_NAME))


def verify_checkpoint(checkpoint: Path) -> dict:
    """The manifest of a complete, unchanged checkpoint; otherwise RunDirError naming the bad file."""
    manifest_path = checkpoint / MANIFEST_NAME
    if not manifest_path.exists():
        raise RunDirError(f"{manifest_path} is missing: {checkpoint} is incomplete or was not written by this script.")
    try:
        manifest = read_json(str(manifest_path))
        files, step = manifest["files"], int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"{manifest_path} is corrupt ({err}).") from err
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise RunDirError(f"{path} is missing.")
        if path.stat().st_size != expected["size"]:
            raise RunDirError(f"{path} is truncated or changed: {path.stat().st_size} bytes, {expected['size']} written.")
        if file_sha256(path) != expected["sha256"]:
            raise RunDirError(f"{path} is corrupt: its SHA-256 differs from the one written.")
    manifest["step"] = step
    return manifest


def trajectory(output_dir, head) -> list[str]:
    """Checkpoint names from ``head`` back through the parents recorded in the manifests."""
    names = []
    while head and head not in names:
        names.append(head)
        manifest = read_manifest(Path(output_dir) / head)
        head = manifest.get("parent") if isinstance(manifest, dict) else None
    return names


def newest_written(output_dir):
    """The checkpoint written last (by manifest sequence), for a dir without a run record."""
    ranked = [(m.get("sequence", 0), d.name) for d in checkpoint_dirs(output_dir) if isinstance(m := read_manifest(d), dict)]
    return max(ranked)[1] if ranked else None


def latest_checkpoint(output_dir):
    """The head of this run's trajectory, verified; None when the run has no checkpoint."""
    record = read_run_record(output_dir)
    head = record.get("head") if record else newest_written(output_dir)
    if head is None:
        return None
    path = Path(output_dir) / head
    try:
        verify_checkpoint(path)
        return path
    except RunDirError as err:
        for earlier in trajectory(output_dir, head)[1:] or [d.name for d in reversed(checkpoint_dirs(output_dir)) if d.name != head]:
            try:
                verify_checkpoint(Path(output_dir) / earlier)
            except RunDirError:
                continue
            raise RunDirError(
                f"The latest checkpoint cannot be resumed: {err} The previous checkpoint verifies: resume with "
                f"--resume_from_checkpoint {Path(output_dir) / earlier}"
            ) from None
        raise RunDirError(f"The latest checkpoint cannot be resumed: {err} No earlier checkpoint verifies.") from None


def prune_checkpoints(output_dir, limit: int, head: str):
    """Keep ``limit`` checkpoints: drop other trajectories' first, then the oldest writes; never the head."""
    keep = set(trajectory(output_dir, head))

    def age(d):
        manifest = read_manifest(d)
        return (d.name in keep, manifest.get("sequence", -1) if isinstance(manifest, dict) else -1)

    candidates = sorted((d for d in checkpoint_dirs(output_dir) if d.name != head), key=age)
    for old in candidates[: max(0, len(candidates) + 1 - limit)]:
        shutil.rmtree(old)


def save_checkpoint(accelerator, output_dir: str, step: int, limit=None, **save_kwargs) -> Path:
    """``accelerator.save_state`` into a temporary folder, add the manifest, rename; then prune."""
    out = Path(output_dir)
    final, tmp, aside = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp", out / f".checkpoint-{step}.old"
    if accelerator.is_main_process:
        for leftover in (tmp, aside):
            if leftover.exists():
                shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **save_kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        head = read_run_record(output_dir)["head"]
        replaced = read_manifest(final) if head == final.name else None  # re-saving the head: keep its parent
        parent = replaced.get("parent") if isinstance(replaced, dict) else head
        sequence = 1 + max([m.get("sequence", 0) for d in checkpoint_dirs(output_dir) if isinstance(m := read_manifest(d), dict)] or [0])
        write_manifest(tmp, step, sequence, parent)
        if final.exists():  # re-saving a step: the old copy stays whole until the new one is in place
            os.replace(final, aside)
        os.replace(tmp, final)
        set_head(output_dir, final.name)
        if aside.exists():
            shutil.rmtree(aside)
        if limit is not None:
            prune_checkpoints(output_dir, limit, final.name)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final
