"""Configuration of ResLoRA: which structure, how many previous blocks, and the plain-LoRA part."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
import math
from typing import Optional, Union

STRUCTURES = ("none", "is", "bs", "ms")
MERGE_METHODS = ("no", "bi", "bw", "ls")


@dataclass
class ResLoRAConfig:
    """ResLoRA settings (arXiv 2402.18039) on top of plain LoRA.

    The LoRA fields mean what they mean in ``peft.LoraConfig``; scaling is ``lora_alpha / r``.
    """

    structure: str = field(
        default="is",
        metadata={"help": "'is' input-shortcut, 'bs' block-shortcut, 'ms' middle-shortcut, or 'none' (plain LoRA)."},
    )
    pre_num: int = field(
        default=1,
        metadata={
            "help": "m, the number of previous blocks a 'bs'/'ms' block uses; -1 means all previous blocks of its "
            "chain. Clipped near a chain's start. 'is' always uses one predecessor."
        },
    )
    r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha; the LoRA output is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (or suffixes) of the nn.Linear modules to adapt, as in peft, or a regex that matches the "
            "whole module name. Required."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained fully and saved beside the adapter (e.g. a classifier head), as in peft."},
    )
    init_lora_weights: bool = field(default=True, metadata={"help": "peft's LoRA init (B = 0); False for random B."})
    merge_window: int = field(
        default=50,
        metadata={"help": "Length of the sliding window of activation norms that the 'bi' merge averages."},
    )
    norm_every: int = field(
        default=4,
        metadata={
            "help": "Under a ShortcutSchedule (the training script, the examples), record the 'bi' merge's activation "
            "norms in every k-th optimizer step only (1: every step). The norm reads a whole activation per layer; "
            "every 4th step keeps 'is' close to LoRA's step time. Without a schedule every training forward records."
        },
    )
    shortcut_decay: Optional[tuple[float, float]] = field(
        default=None,
        metadata={
            "help": "(start, end) fractions of training: every shortcut term is multiplied by lambda, which is 1 "
            "until start, falls (cosine) to exactly 0 at end and stays 0. At lambda = 0 the model is plain LoRA, "
            "so the export is exact. None keeps lambda = 1 (the paper's ResLoRA)."
        },
    )
    merge_at: Optional[float] = field(
        default=None,
        metadata={
            "help": "Fraction of training at which 'is'/'ms' are merged into their own LoRA factors in place "
            "(A_n <- A*_n) and training goes on as plain LoRA, so the export is exact. None: never."
        },
    )

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ValueError(
                f"Unknown ResLoRA structure {self.structure!r}. Choose one of {', '.join(STRUCTURES)} "
                "('is' input-shortcut, 'bs' block-shortcut, 'ms' middle-shortcut, 'none' plain LoRA)."
            )
        if not isinstance(self.pre_num, int) or isinstance(self.pre_num, bool):
            raise ValueError(f"pre_num must be an integer, got {self.pre_num!r}.")
        if self.pre_num < -1 or self.pre_num == 0:
            raise ValueError(
                f"pre_num={self.pre_num} is invalid: use a positive number of previous blocks, or -1 for all "
                "previous blocks of a chain."
            )
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"The LoRA rank r must be a positive integer, got {self.r!r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.target_modules:
            raise ValueError(
                "target_modules is required: name the nn.Linear modules to adapt, e.g. "
                "['to_q', 'to_k', 'to_v', 'to_out.0'] for a diffusers UNet or ['q_proj', 'v_proj'] for LLaMA."
            )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.merge_window < 1:
            raise ValueError(f"merge_window must be >= 1, got {self.merge_window}.")
        if not isinstance(self.norm_every, int) or self.norm_every < 1:
            raise ValueError(f"norm_every must be a positive integer, got {self.norm_every!r}.")
        if self.shortcut_decay is not None:
            try:
                start, end = (float(v) for v in self.shortcut_decay)
            except (TypeError, ValueError):
                raise ValueError(
                    f"shortcut_decay must be two fractions (start, end) with 0 <= start < end <= 1, got "
                    f"{self.shortcut_decay!r}."
                ) from None
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(
                    f"shortcut_decay=({start}, {end}) is invalid: use 0 <= start < end <= 1, e.g. (0.5, 0.9): "
                    "full shortcuts for the first half of training, none from 90% on."
                )
            self.shortcut_decay = (start, end)
        if self.merge_at is not None:
            if not 0.0 < float(self.merge_at) < 1.0:
                raise ValueError(f"merge_at must be a fraction of training in (0, 1), got {self.merge_at!r}.")
            if self.structure not in ("is", "ms"):
                raise ValueError(
                    f"merge_at applies to 'is' and 'ms' only (got structure {self.structure!r}): 'bs' merges "
                    "exactly but to a larger rank, which cannot replace its factors in place; use shortcut_decay."
                )
            if self.shortcut_decay is not None:
                raise ValueError("Use either shortcut_decay or merge_at, not both: each ends training as plain LoRA.")
            self.merge_at = float(self.merge_at)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def shortcut_scale(self, progress: float) -> float:
        """lambda at ``progress`` = step / max_train_steps under ``shortcut_decay`` (1 without it)."""
        if self.shortcut_decay is None:
            return 1.0
        start, end = self.shortcut_decay
        if progress <= start:
            return 1.0
        if progress >= end:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * (progress - start) / (end - start)))

    def to_lora_config(self):
        """The plain ``peft.LoraConfig`` whose layers ResLoRA is built on."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            init_lora_weights=self.init_lora_weights,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ResLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown ResLoRAConfig fields {sorted(unknown)}; known fields: {sorted(known)}.")
        data = dict(data)
        if data.get("shortcut_decay") is not None:  # JSON stores the tuple as a list
            data["shortcut_decay"] = tuple(data["shortcut_decay"])
        return cls(**data)
