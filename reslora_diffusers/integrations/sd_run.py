"""What a Stable Diffusion ResLoRA run writes at its end, shared by the training script and
``python -m reslora_diffusers.integrations.merge``: the merged plain LoRA, the merge report and the model card.

A run keeps a fixed calibration set of UNet inputs (noisy latents, timesteps, text embeddings) in
``reslora_calibration.safetensors``: the first half fits the ``ls`` merge, the second half measures
every merge's error, so a run can be re-merged later without its dataset. The training script builds
the two halves from different images, each with timesteps spread over the whole range.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch

from ..core.export import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    atomic_save_file,
    atomic_write_text,
    file_sha256,
    load_safetensors,
    read_json,
    save_pipeline_lora,
)
from ..core.merging import merge_error, merge_reslora
from ..core.model import get_controller

CALIBRATION_NAME = "reslora_calibration.safetensors"
REPORT_NAME = "merge_report.json"
CARD_NAME = "README.md"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention (--train_text_encoder)
TEXT_ENCODER_STATE_DIR = "text_encoder"  # its training state, in a subfolder of the run or checkpoint
#: held-out relative output error of an is/ms merge above which a merge (end of training, re-merge) warns
MERGE_ERROR_WARNING = 0.05
#: the --shortcut_decay window the warning suggests (the training script's default on its embedded base)
SUGGESTED_SHORTCUT_DECAY = (0.3, 0.8)


def unet_forward(unet, batch):
    """The calibration forward: ``batch`` is (noisy_latents, timesteps, encoder_hidden_states)."""
    noisy, timesteps, hidden = batch
    dtype = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    device = next(unet.parameters()).device
    return unet(noisy.to(device, dtype), timesteps.to(device), encoder_hidden_states=hidden.to(device, dtype)).sample


def text_encoder_forward(text_encoder, batch):
    """The text-encoder calibration forward: ``batch`` is (input_ids,)."""
    return text_encoder(batch[0].to(next(text_encoder.parameters()).device), return_dict=False)[0]


def save_calibration(batches: list[tuple], output_dir: str, text_batches: Optional[list[tuple]] = None):
    """UNet inputs, and the token ids they came from (the text encoder's calibration inputs)."""
    tensors = {}
    for i, (noisy, timesteps, hidden) in enumerate(batches):
        tensors[f"{i}.noisy_latents"] = noisy
        tensors[f"{i}.timesteps"] = timesteps
        tensors[f"{i}.encoder_hidden_states"] = hidden
    for i, (input_ids,) in enumerate(text_batches or []):
        tensors[f"{i}.input_ids"] = input_ids
    atomic_save_file(tensors, os.path.join(output_dir, CALIBRATION_NAME))


def load_calibration(output_dir: str) -> list[tuple]:
    path = os.path.join(output_dir, CALIBRATION_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No calibration set {path}; it is written by train_text_to_image_reslora.py.")
    tensors = load_safetensors(path)
    count = len({k.split(".")[0] for k in tensors})
    return [
        (tensors[f"{i}.noisy_latents"], tensors[f"{i}.timesteps"], tensors[f"{i}.encoder_hidden_states"])
        for i in range(count)
    ]


def load_text_calibration(output_dir: str) -> list[tuple]:
    """The token-id batches saved beside the UNet calibration (empty for runs that predate them)."""
    tensors = load_safetensors(os.path.join(output_dir, CALIBRATION_NAME))
    return [(tensors[k],) for k in sorted((k for k in tensors if k.endswith(".input_ids")), key=lambda k: int(k.split(".")[0]))]


def split_calibration(batches: list) -> tuple[list, list]:
    """First half fits (ls), second half measures; one batch serves both."""
    if len(batches) < 2:
        return batches, batches
    half = len(batches) // 2
    return batches[:half], batches[half:]


def merge_unet(unet, method: str, calibration_batches: Optional[list] = None, svd_rank: Optional[int] = None,
               forward_fn=unet_forward):
    """Merge a ResLoRA UNet (or, with ``text_encoder_forward``, a text encoder); the report's errors are
    measured on the held-out half of the calibration set."""
    fit, held_out = split_calibration(calibration_batches or [])
    controller = get_controller(unet)
    structure = controller.config.structure
    if not controller.traced and calibration_batches:  # chains are traced on the first forward
        with torch.no_grad():
            forward_fn(unet, calibration_batches[0])
    needs_fit = method == "ls" and structure in ("is", "ms")
    result = merge_reslora(
        unet, method=method, calibration_batches=fit if needs_fit else None, forward_fn=forward_fn, svd_rank=svd_rank
    )
    if held_out:
        result.report["held_out"] = merge_error(unet, result.factors, held_out, forward_fn)
        result.report["held_out"]["note"] = "relative error of the merged model output against the unmerged one"
        result.report["held_out"]["num_inputs"] = sum(len(batch[0]) for batch in held_out)
        if all(len(batch) == 3 for batch in held_out):  # UNet inputs: (noisy latents, timesteps, text embeddings)
            result.report["held_out"]["timesteps"] = sorted(int(t) for _, ts, _ in held_out for t in ts)
    return result


def text_encoder_prefix(text_encoder) -> str:
    """The export prefix of the text encoder's keys. SD LoRAs name CLIP's layers ``text_model.encoder.…``
    (transformers 4's module names), and ComfyUI/A1111 look for those (``lora_te1_text_model_…``).
    transformers 5 dropped ``text_model.`` from the module names; diffusers loads both forms."""
    return "text_encoder" if hasattr(text_encoder, "text_model") else "text_encoder.text_model"


def merge_pipeline(unet, method: str, calibration_batches, text_encoder=None, text_batches=None, svd_rank=None):
    """``{"unet": MergeResult}``, plus ``"text_encoder"`` when it is given (trained with ResLoRA too)."""
    results = {"unet": merge_unet(unet, method, calibration_batches, svd_rank)}
    if text_encoder is not None:
        results["text_encoder"] = merge_unet(text_encoder, method, text_batches, svd_rank, text_encoder_forward)
    return results


def export_run(unet, output_dir: str, method: str, calibration_batches: Optional[list], svd_rank=None, extra=None,
               card: Optional[dict] = None, export_format: str = "both", text_encoder=None, text_batches=None):
    """Merge; write the LoRA file(s) of ``export_format``, ``merge_report.json`` and (given ``card``) the model card.

    They are written to a staging folder, then renamed into place with the report last. The report
    records each LoRA file's SHA-256, so a set left half-renamed by a crash is detected (:func:`export_complete`).
    """
    results = merge_pipeline(unet, method, calibration_batches, text_encoder, text_batches, svd_rank)
    exported = {"unet": results["unet"]}
    if text_encoder is not None:
        exported[text_encoder_prefix(text_encoder)] = results["text_encoder"]
    report = {**results["unet"].report, **(extra or {})}
    if text_encoder is not None:
        report["text_encoder"] = results["text_encoder"].report
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=output_dir) as staging:
        paths = save_pipeline_lora(exported, staging, export_format)
        report["lora_sha256"] = {os.path.basename(p): file_sha256(p) for p in paths}
        atomic_write_text(json.dumps(report, indent=2, sort_keys=True), os.path.join(staging, REPORT_NAME))
        names = [os.path.basename(p) for p in paths]
        if card is not None:
            merge = report["method"]  # "exact" for bs, and for is/ms once the shortcuts are gone (lambda = 0)
            held = report.get("held_out", {}).get("relative_output_error")
            info = {**card, "merge": merge, "steps": report.get("steps"), "held_out_error": held, "files": list(names)}
            atomic_write_text(model_card(output_dir, info), os.path.join(staging, CARD_NAME))
            names.append(CARD_NAME)
        for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):  # a file of another --export_format: not this export
            if name not in names and os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        for name in [*names, REPORT_NAME]:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    return report


def remove_export(output_dir: str):
    """Remove an export's report (its commit record) and LoRA files."""
    for name in (REPORT_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))


def export_complete(output_dir: str) -> bool:
    """The export's report is there, and every LoRA file it lists is there with the SHA-256 it records."""
    report = os.path.join(output_dir, REPORT_NAME)
    if not os.path.exists(report):
        return False
    try:
        hashes = read_json(report).get("lora_sha256")
        return bool(hashes) and all(
            os.path.exists(os.path.join(output_dir, name)) and file_sha256(os.path.join(output_dir, name)) == sha
            for name, sha in hashes.items()
        )
    except (ValueError, AttributeError):
        return False


def python_str(text: str) -> str:
    """``text`` as a Python string literal for the card's snippet (quotes, backslashes of Windows paths)."""
    return json.dumps(text)


def snippet_call(info: dict) -> list[str]:
    """The card snippet's ``pipe(...)`` line(s). With the run's ``sample_settings`` it passes the progress grid's
    sampling settings and seed, so on the CPU it draws the grid's first export sample of a CPU run (a GPU run's grid
    drew its noise on the GPU); the pipeline's own defaults (50 steps, guidance 7.5) can look unlike the grid.
    Cards of runs recorded before ``sample_settings`` call ``pipe(prompt)``."""
    prompt = python_str(info.get("example_prompt", "a cartoon creature"))
    settings = info.get("sample_settings")
    if not settings:
        return [f'image = pipe({prompt}).images[0]']
    return [
        "# the progress grid's settings and seed (on the CPU: the grid's first export sample of a CPU run)",
        f'image = pipe({prompt}, num_inference_steps={settings["num_inference_steps"]}, '
        f'guidance_scale={settings["guidance_scale"]},',
        f'             height={settings["height"]}, width={settings["width"]}, '
        f'generator=torch.Generator().manual_seed({settings["seed"]})).images[0]',
    ]


def model_card(output_dir: str, info: dict) -> str:
    """A diffusers-style model card (``README.md``) for the LoRA exported to ``output_dir``."""
    base = info.get("base_model", "")
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "license: creativeml-openrail-m",
        "tags:",
        "- stable-diffusion",
        "- text-to-image",
        "- diffusers",
        "- lora",
        "- reslora",
        "inference: true",
        "---",
        "",
        f"# ResLoRA text-to-image fine-tune of {base}",
        "",
        f"A plain LoRA for `{base}`, trained with ResLoRA (arXiv 2402.18039) on `{info.get('dataset')}` and merged "
        "so that it loads and runs like any LoRA (no extra cost at inference).",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("structure", "pre_num", "rank", "lora_alpha", "merge", "shortcut_decay", "merge_at", "steps",
                "resolution", "learning_rate", "seed"):
        if info.get(key) is not None:
            lines.append(f"| {key} | {info[key]} |")
    held = info.get("held_out_error")
    if held is not None:
        lines.append(f"| merge error (held-out, relative UNet output) | {held:.3g} |")
    lines += ["", "## Progress", ""]
    if os.path.exists(os.path.join(output_dir, "progress_grid.png")):
        lines += ["Rows are prompts, columns are training steps:", "", "![progress](./progress_grid.png)", ""]
    lines += [
        "## How to use",
        "",
    ]
    files = info["files"]  # the LoRA files of this export
    if KOHYA_WEIGHT_NAME in files:
        lines += [f"ComfyUI / AUTOMATIC1111: put `{KOHYA_WEIGHT_NAME}` in the LoRA folder. diffusers:", ""]
    weight_name = DIFFUSERS_WEIGHT_NAME if DIFFUSERS_WEIGHT_NAME in files else KOHYA_WEIGHT_NAME
    lines += [
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained({python_str(base)})',
        f'pipe.load_lora_weights({python_str(info.get("repo_or_path", output_dir))}, weight_name={python_str(weight_name)})',
        "pipe.fuse_lora()  # optional: fold the LoRA into the weights, zero inference overhead",
        *snippet_call(info),
        "```",
        "",
        "`merge_report.json` lists each module's merge coefficients and the merge error. The unmerged training "
        "state (`reslora_training_state.*`) can be re-merged with `python -m reslora_diffusers.integrations.merge DIR --merge ls`.",
        "",
    ]
    return "\n".join(lines)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def merge_summary(report: dict, advice: str = "") -> str:
    """How far an export is from the trained model, per trained part (the UNet, and the text encoder when it was
    trained), with the fix when a part is far (``merge_report.json``); ``advice`` goes before the fix."""
    parts = {"UNet": report}
    if "text_encoder" in report:
        parts["text encoder"] = report["text_encoder"]
    if all(part["method"] == "exact" for part in parts.values()):
        return "The export is exact: it computes what was trained."
    lines = [merge_line(name, part) for name, part in parts.items()]
    if any(part.get("held_out", {}).get("relative_output_error", 0.0) > MERGE_ERROR_WARNING for part in parts.values()):
        lines.append(
            f"Warning: that is more than {MERGE_ERROR_WARNING:.0%}, so the export may not draw what training learned. "
            f"{advice}For an export that is exactly the trained model, train with --shortcut_decay "
            f"{SUGGESTED_SHORTCUT_DECAY[0]} {SUGGESTED_SHORTCUT_DECAY[1]} (or --merge_at 0.6), or use "
            "--reslora_structure bs or none.")
    return " ".join(lines)


def merge_line(name: str, part: dict) -> str:
    """One trained part's merge: exact, its held-out output error, or unmeasured."""
    held = part.get("held_out", {}).get("relative_output_error")
    title = name[:1].upper() + name[1:]
    if part["method"] == "exact":
        return f"The {name} export is exact."
    if held is None:
        return f"{title} merge '{part['method']}': its error was not measured (no held-out calibration batches)."
    return (f"{title} merge '{part['method']}': on held-out batches the export's {name} output differs from the "
            f"trained model's by {held:.1%}.")
