"""The ResLoRA method itself: configuration, the peft LoRA variant, chains, merges, merge-aware schedule, export.

Needs torch, peft and safetensors only (diffusers is imported lazily, by the kohya export alone).
"""

from .config import MERGE_METHODS, STRUCTURES, ResLoRAConfig
from .export import load_training_state, save_merged_lora, save_training_state
from .merging import MergeResult, merge_error, merge_reslora, merge_shortcuts_in_place, merged_view
from .model import inject_reslora, remove_reslora
from .schedule import ShortcutSchedule, reset_optimizer_state

__all__ = [
    "MERGE_METHODS",
    "STRUCTURES",
    "MergeResult",
    "ResLoRAConfig",
    "ShortcutSchedule",
    "inject_reslora",
    "load_training_state",
    "merge_error",
    "merge_reslora",
    "merge_shortcuts_in_place",
    "merged_view",
    "remove_reslora",
    "reset_optimizer_state",
    "save_merged_lora",
    "save_training_state",
]
