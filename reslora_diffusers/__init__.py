"""ResLoRA (arXiv 2402.18039) for the Hugging Face stack."""

from .config import MERGE_METHODS, STRUCTURES, ResLoRAConfig
from .export import load_training_state, save_merged_lora, save_training_state
from .merging import MergeResult, merge_error, merge_reslora, merge_shortcuts_in_place, merged_view
from .model import calibration, get_controller, inject_reslora, module_kind, remove_reslora
from .schedule import ShortcutSchedule, reset_optimizer_state

__all__ = [
    "MERGE_METHODS",
    "MergeResult",
    "load_training_state",
    "merge_error",
    "merge_reslora",
    "merge_shortcuts_in_place",
    "merged_view",
    "save_merged_lora",
    "save_training_state",
    "STRUCTURES",
    "ResLoRAConfig",
    "ShortcutSchedule",
    "reset_optimizer_state",
    "calibration",
    "get_controller",
    "inject_reslora",
    "module_kind",
    "remove_reslora",
]
