"""ResLoRA (arXiv 2402.18039) for the Hugging Face stack.

- ``reslora_diffusers.core``: the method (torch, peft, safetensors). Its public API is re-exported here.
- ``reslora_diffusers.integrations``: training glue: the shared CLI flags, accelerate/distributed checks,
  Stable Diffusion training helpers and run folders, the transformers fine-tuning driver, the re-merge CLI.
- ``reslora_diffusers.demo``: the embedded offline default: the tiny SD2-layout base and its assets, the
  procedural datasets, the style score and the grids.
"""

from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401
