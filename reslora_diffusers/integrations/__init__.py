"""Training glue around the core: shared CLI flags (``cli``), accelerate and distributed checks
(``distributed``), Stable Diffusion training helpers (``sd_training``) and run folders (``run_dir``,
``sd_run``), the transformers fine-tuning driver (``transformers_finetune``) and the re-merge CLI (``merge``).
"""
