"""Re-merge a finished (or checkpointed) training run with another merge method, without training.

    python -m reslora_diffusers.integrations.merge OUTPUT_DIR --merge ls

Reads the unmerged training state and the calibration set the run saved, loads the base UNet (and, for a
``--train_text_encoder`` run, the text encoder) it was trained on, and rewrites the LoRA file(s)
(``pytorch_lora_weights.safetensors`` and/or ``pytorch_lora_weights_kohya.safetensors``, ``--export_format``),
``merge_report.json`` and the model card as one set. A checkpoint folder can be read, but the export must
go elsewhere (``--output_dir``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..core.config import MERGE_METHODS
from ..core.export import EXPORT_FORMATS, STATE_CONFIG_NAME, load_training_state, read_training_state_config
from .run_dir import MANIFEST_NAME
from .sd_run import (
    CALIBRATION_NAME,
    TEXT_ENCODER_STATE_DIR,
    export_run,
    load_calibration,
    load_text_calibration,
    merge_summary,
)


def is_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, MANIFEST_NAME)) or re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.abspath(path))) is not None


def load_trained_text_encoder(run_dir: str, base: str, revision=None):
    """The run's text encoder with its ResLoRA state, or None if the run did not train it."""
    text_dir = os.path.join(run_dir, TEXT_ENCODER_STATE_DIR)
    if not os.path.exists(os.path.join(text_dir, STATE_CONFIG_NAME)):
        return None
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=revision)
    text_encoder.requires_grad_(False)
    load_training_state(text_encoder, text_dir)
    return text_encoder.eval()


def remerge(args) -> str:
    out = args.output_dir or args.run_dir
    if is_checkpoint(out):
        raise ValueError(
            f"{out} is a training checkpoint; writing an export into it would change the checkpoint. "
            "Pass --output_dir with another folder."
        )
    meta = read_training_state_config(args.run_dir)
    run_info = meta.get("extra", {})
    base = args.pretrained_model_name_or_path or run_info.get("pretrained_model_name_or_path")
    if not base:
        raise ValueError(f"The run in {args.run_dir} does not name its base model; pass --pretrained_model_name_or_path.")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=run_info.get("revision"))
    unet.requires_grad_(False)
    load_training_state(unet, args.run_dir)
    unet.eval()
    text_encoder = load_trained_text_encoder(args.run_dir, base, run_info.get("revision"))
    calib_dir = args.run_dir
    if not os.path.exists(os.path.join(calib_dir, CALIBRATION_NAME)):
        calib_dir = os.path.dirname(os.path.abspath(args.run_dir))  # a checkpoint folder: the run's
    calibration = load_calibration(calib_dir)
    extra = {"re_merged_from": args.run_dir, "steps": run_info.get("steps")}
    card = run_info.get("card") or {"base_model": base, "dataset": run_info.get("dataset")}
    report = export_run(unet, out, args.merge, calibration, svd_rank=args.svd_rank, extra=extra, card=card,
                        export_format=args.export_format, text_encoder=text_encoder,
                        text_batches=load_text_calibration(calib_dir) if text_encoder is not None else None)
    return (f"Merged '{report['structure']}' with '{args.merge}' into {out} (errors in merge_report.json).\n"
            f"{merge_summary(report)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reslora_diffusers.integrations.merge", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="A training output_dir (or a checkpoint-N folder inside it, with --output_dir).")
    parser.add_argument("--merge", choices=MERGE_METHODS, required=True, help="Merge method for is/ms.")
    parser.add_argument("--output_dir", default=None, help="Where to write the export (default: run_dir).")
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="Base model (default: the run's).")
    parser.add_argument("--svd_rank", type=int, default=None, help="Compress bs factors to this rank.")
    parser.add_argument("--export_format", choices=EXPORT_FORMATS, default="both",
                        help="diffusers (load_lora_weights), kohya (ComfyUI, A1111) or both.")
    args = parser.parse_args(argv)
    try:
        print(remerge(args))
    except (OSError, ValueError) as err:  # the loaders' messages name the file
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
