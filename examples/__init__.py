"""The transformers examples; importable from the repository root as ``examples.train_llama_reslora``."""
