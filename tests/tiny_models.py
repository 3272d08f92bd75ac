"""Tiny models built from configs (no hub) and the inputs the tests feed them."""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from reslora_diffusers.demo.tiny_sd2 import TINY_CROSS_ATTENTION_DIM, build_tiny_unet

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]  # deterministic base model
    targets: list
    batch: Callable[[int], tuple]  # seed -> positional inputs
    modules_to_save: list = None

    def output(self, model, batch):
        out = model(*batch)
        for attr in ("sample", "logits"):
            if hasattr(out, attr):
                return getattr(out, attr)
        return out


def unet_batch(seed, batch_size=2, size=16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch_size, 4, size, size, generator=g),
        torch.randint(0, 1000, (batch_size,), generator=g),
        torch.randn(batch_size, 77, TINY_CROSS_ATTENTION_DIM, generator=g),
    )


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def build_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return RobertaForSequenceClassification(cfg).eval()


def token_batch(seed, batch_size=2, length=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, 64, (batch_size, length), generator=g),)


def build_sequential():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)
    ).eval()


def seq_batch(seed):
    return (torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)),)


CASES = {
    "unet": Case("unet", lambda: build_tiny_unet(seed=0).eval(), UNET_TARGETS, unet_batch),
    "llama": Case("llama", build_llama, ["q_proj", "v_proj"], token_batch),
    "roberta": Case("roberta", build_roberta, ["query", "value"], token_batch, modules_to_save=["classifier"]),
    "sequential": Case("sequential", build_sequential, ["0", "2", "4", "6"], seq_batch),
}


def randomize_lora(model, seed=0, scale=0.3):
    """Nonzero A and B (LoRA's B = 0 init hides every shortcut)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
