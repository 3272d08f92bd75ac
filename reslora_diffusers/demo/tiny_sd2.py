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


# ---------------------------------------------------------------------------------------------
# The rest of the tiny pipeline: VAE, text encoder, tokenizer, scheduler, and the shipped base.
# ---------------------------------------------------------------------------------------------

import json
import os
from pathlib import Path

TINY_VAE_BLOCK_OUT_CHANNELS = (16, 32, 64, 64)
TINY_LATENT_CHANNELS = 4
TINY_RESOLUTION = 64  # pixels; latents are 8x8 (vae scale factor 8)
TINY_TEXT_LAYERS = 2
TINY_MODEL_MAX_LENGTH = 77

#: The shipped, pretrained tiny base (built by scripts/build_tiny_base.py).
TINY_BASE_PATH = str(Path(__file__).resolve().parent / "assets" / "tiny-sd2-base")


def tiny_vae_config(sample_size: int = TINY_RESOLUTION) -> dict:
    """Config of a 4-level AutoencoderKL (vae scale factor 2**3 = 8, 4 latent channels)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=TINY_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=1.0,  # set from the latent statistics after training
    )


def build_tiny_vae(seed: int = 0):
    """A randomly initialised tiny AutoencoderKL (deterministic for a seed)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**tiny_vae_config())


# Words the BPE merges are learned from; any other text still tokenizes (byte-level fallback).
_BPE_CORPUS = """
a an the of on in at with and or to is are its it this that by for from very big small tiny large little long short
red green blue yellow purple orange pink white black gray grey brown cyan magenta violet teal lime beige
light dark pale bright pastel colorful colourful plain gradient background backgrounds
circle square triangle star diamond heart ring cross hexagon shape shapes
left right top bottom middle center centre corner upper lower side
cartoon creature creatures monster pokemon character animal drawing illustration picture image photo style
eye eyes ear ears tail tails wing wings horn horns leg legs feet foot arm arms mouth smile smiling face head body
round pointy fluffy cute happy angry sleepy spiky curly wavy thick thin outline outlines black-outlined flat fill
has have holding standing sitting flying looking cat dog bird fish dragon mouse bunny bear fox frog turtle
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A deterministic CLIP-style byte-level BPE vocabulary learned from a fixed word list.

    Layout as in CLIP's vocab: the 256 byte symbols, the same with "</w>", the merge results in
    merge order, then <|startoftext|> and <|endoftext|>.
    """
    byte_syms = list(_bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms]
    words: dict[tuple[str, ...], int] = {}
    for w in _BPE_CORPUS.split():
        for part in w.replace("-", " - ").split():
            sym = tuple(part[:-1]) + (part[-1] + "</w>",)
            words[sym] = words.get(sym, 0) + 1
    merges: list[str] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for sym, f in words.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + f
        if not pairs:
            break
        # most frequent pair; ties broken lexicographically, so the result is deterministic
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab_list.append(best[0] + best[1])
        new_words = {}
        for sym, f in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + f
        words = new_words
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for tok in vocab_list:
        if tok not in seen:
            seen[tok] = len(seen)
    return seen, merges


def write_tiny_tokenizer_files(directory: str | os.PathLike) -> tuple[str, str]:
    """Write vocab.json and merges.txt (CLIP format, with the "#version" header) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_bpe_vocab_and_merges()
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(vocab_file), str(merges_file)


def build_tiny_tokenizer(directory: str | os.PathLike | None = None):
    """A CLIPTokenizer built from locally written vocab.json + merges.txt (model_max_length 77)."""
    import tempfile

    from transformers import CLIPTokenizer

    def _load(d):
        write_tiny_tokenizer_files(d)
        return CLIPTokenizer.from_pretrained(str(d), model_max_length=TINY_MODEL_MAX_LENGTH, local_files_only=True)

    if directory is not None:
        return _load(directory)
    with tempfile.TemporaryDirectory() as d:
        return _load(d)


def tiny_text_config(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_CROSS_ATTENTION_DIM,  # == the UNet's cross_attention_dim
        intermediate_size=4 * TINY_CROSS_ATTENTION_DIM,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=TINY_MODEL_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_tiny_text_encoder(tokenizer=None, seed: int = 0):
    """A small CLIPTextModel (hidden size 80), deterministic for a seed; meant to stay frozen."""
    from transformers import CLIPTextModel

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_text_config(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.requires_grad_(False)
    return model.eval()


def tiny_scheduler_config() -> dict:
    """SD2-style v-prediction noise schedule (scaled linear betas, 1000 train steps)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_scheduler(kind: str = "ddim"):
    """A DDIMScheduler (for sampling) or DDPMScheduler (for training), both v-prediction."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = tiny_scheduler_config()
    if kind == "ddim":
        return DDIMScheduler(**cfg)
    if kind == "ddpm":
        cfg.pop("set_alpha_to_one")
        return DDPMScheduler(**cfg)
    raise ValueError(f"unknown scheduler kind {kind!r}")


def build_tiny_pipeline(seed: int = 0):
    """An untrained tiny StableDiffusionPipeline with SD2's layout (deterministic for a seed)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tiny_tokenizer()
    return StableDiffusionPipeline(
        vae=build_tiny_vae(seed),
        text_encoder=build_tiny_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=build_tiny_unet(seed, sample_size=TINY_RESOLUTION // 8),
        scheduler=build_tiny_scheduler("ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_tiny_base(dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None):
    """Load the shipped pretrained tiny base (offline) as a StableDiffusionPipeline in ``dtype``."""
    from diffusers import StableDiffusionPipeline

    path = str(path or TINY_BASE_PATH)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found; build it with scripts/build_tiny_base.py --out {path}")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)

