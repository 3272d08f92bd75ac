"""A tiny model with Stable Diffusion 2's layout, built from configs (no hub access).

Keeps SD2's shape pattern: 3 CrossAttnDownBlock2D + DownBlock2D, a mid block with attention,
UpBlock2D + 3 CrossAttnUpBlock2D, linear projections, upcast attention, a cross-attention width
unlike any channel width, and v-prediction. Widths c0 < c1 < c2 == c3, as SD2's 320/640/1280/1280,
so the runs of equal weight shape (2, 2, 6, 3, 3) and of equal token count (2, 2, 2, 1, 3, 3, 3)
of the attention projections are the same as in SD2.
"""

from __future__ import annotations

import torch

TINY_BLOCK_OUT_CHANNELS = (32, 64, 96, 96)
TINY_CROSS_ATTENTION_DIM = 80


def tiny_unet_config(sample_size: int = 8) -> dict:
    """Config of the tiny SD2-layout UNet2DConditionModel."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=TINY_BLOCK_OUT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # diffusers' SD2 configs put the number of heads in attention_head_dim (head width 64 in SD2, 16 here)
        attention_head_dim=(2, 4, 6, 6),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    )


def build_tiny_unet(seed: int = 0, sample_size: int = 8):
    """A randomly initialised tiny SD2-layout UNet (deterministic for a seed)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**tiny_unet_config(sample_size))
