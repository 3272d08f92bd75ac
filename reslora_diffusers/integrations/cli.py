"""The ResLoRA command-line flags, shared by the SD training script, the transformers examples and the benchmarks.

``add_reslora_args(parser)`` adds one set of flags with one set of defaults; ``reslora_config_from_args(args,
target_modules)`` turns them into a validated ``ResLoRAConfig``. The examples' old names (``--structure``,
``--num_calibration_batches``) still work for one release and print a deprecation message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..core.config import MERGE_METHODS, STRUCTURES, ResLoRAConfig

#: the defaults of every entry point (script, examples, benchmarks)
RESLORA_DEFAULTS = dict(reslora_structure="is", pre_num=1, rank=4, lora_alpha=None, lora_dropout=0.0, merge="ls",
                        merge_window=50, calibration_batches=4)
#: old flag name -> new flag name (the transformers examples' names until 0.1)
DEPRECATED_FLAGS = {"--structure": "--reslora_structure", "--num_calibration_batches": "--calibration_batches"}


class _Deprecated(argparse.Action):
    """Stores into the new flag's destination and says that the old name is deprecated."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = DEPRECATED_FLAGS[option_string]
        print(f"warning: {option_string} is deprecated and will be removed in the next release; use {new}.",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_reslora_args(parser, rank_default: Optional[int] = RESLORA_DEFAULTS["rank"],
                     rank_help: str = "LoRA rank r.") -> argparse._ArgumentGroup:
    """Add the ResLoRA flags (a "ResLoRA" group) to ``parser``; returns the group. A script whose rank default
    depends on other flags passes ``rank_default=None`` and says so in ``rank_help``."""
    d = RESLORA_DEFAULTS
    g = parser.add_argument_group("ResLoRA")
    g.add_argument("--reslora_structure", default=d["reslora_structure"], metavar="{" + ",".join(STRUCTURES) + "}",
                   help="'is' input-shortcut, 'bs' block-shortcut, 'ms' middle-shortcut, 'none' plain LoRA through "
                        "the same code path.")
    g.add_argument("--structure", dest="reslora_structure", action=_Deprecated,
                   help=argparse.SUPPRESS)
    g.add_argument("--pre_num", type=int, default=d["pre_num"],
                   help="m, the previous blocks a bs/ms block uses; -1 = all ('is' always uses 1).")
    g.add_argument("--rank", type=int, default=rank_default, help=rank_help)
    g.add_argument("--lora_alpha", type=float, default=d["lora_alpha"],
                   help="LoRA alpha (scale alpha / r). Default: the rank (scale 1), as diffusers.")
    g.add_argument("--lora_dropout", type=float, default=d["lora_dropout"], help="Dropout on the LoRA input.")
    g.add_argument("--merge", default=d["merge"], metavar="{" + ",".join(MERGE_METHODS) + "}",
                   help="How is/ms are merged into plain LoRA: ls least squares on calibration batches (ours), "
                        "bi input norms / bw weight norms (the paper's), no drop the shortcuts. bs is exact.")
    g.add_argument("--merge_window", type=int, default=d["merge_window"],
                   help="Window of recorded activation norms for the bi merge.")
    g.add_argument("--calibration_batches", type=int, default=d["calibration_batches"],
                   help="Fixed training batches kept to fit the ls merge and to measure every merge's error.")
    g.add_argument("--num_calibration_batches", dest="calibration_batches", type=int, action=_Deprecated,
                   help=argparse.SUPPRESS)
    g.add_argument("--shortcut_decay", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="Anneal the shortcuts: their weight is 1 until fraction START of training, falls (cosine) "
                        "to 0 at END and stays 0, so the export is exact plain LoRA. E.g. 0.3 0.8.")
    g.add_argument("--merge_at", type=float, default=None, metavar="F",
                   help="is/ms: at fraction F of training merge the shortcuts in place (--merge method) and train "
                        "on as plain LoRA, so the export is exact. Not with DeepSpeed.")
    return g


def reslora_config_from_args(args, target_modules, modules_to_save: Optional[list[str]] = None) -> ResLoRAConfig:
    """The ``ResLoRAConfig`` of the parsed flags (raises ``ValueError`` naming a bad value)."""
    if args.merge not in MERGE_METHODS:
        raise ValueError(f"Unknown --merge {args.merge!r}; choose one of {', '.join(MERGE_METHODS)}.")
    if args.calibration_batches < 1:
        raise ValueError(f"--calibration_batches {args.calibration_batches} must be greater than 0.")
    alpha = float(args.rank) if args.lora_alpha is None else args.lora_alpha
    return ResLoRAConfig(
        structure=args.reslora_structure, pre_num=args.pre_num, r=args.rank, lora_alpha=alpha,
        lora_dropout=args.lora_dropout, target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None, merge_window=args.merge_window,
        shortcut_decay=tuple(args.shortcut_decay) if args.shortcut_decay else None, merge_at=args.merge_at,
    )
