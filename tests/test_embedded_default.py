"""The embedded offline default: the shipped tiny SD2-layout base, the pokemon-style dataset, the style score."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import time  # noqa: E402
from itertools import groupby  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from reslora_diffusers.demo.tiny_sd2 import (  # noqa: E402
    TINY_BASE_PATH,
    TINY_CROSS_ATTENTION_DIM,
    build_tiny_tokenizer,
    load_tiny_base,
    tiny_bpe_vocab_and_merges,
)

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
KINDS = [f"{a}.{p}" for a in ("attn1", "attn2") for p in PROJECTIONS]


def runs(seq):
    """Lengths of the runs of consecutive equal items."""
    return tuple(len(list(g)) for _, g in groupby(seq))


@pytest.fixture(scope="module")
def base():
    if not os.path.isdir(TINY_BASE_PATH):
        pytest.fail(f"shipped base missing at {TINY_BASE_PATH}; run scripts/build_tiny_base.py")
    return load_tiny_base(torch.float32)


def test_shipped_base_loads_offline(base):
    from diffusers import StableDiffusionPipeline

    assert isinstance(base, StableDiffusionPipeline)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert base.unet.dtype == torch.float32 and base.vae.dtype == torch.float32
    assert base.scheduler.config.prediction_type == "v_prediction"
    assert base.vae_scale_factor == 8 and base.vae.config.latent_channels == 4
    assert base.text_encoder.config.hidden_size == base.unet.config.cross_attention_dim == TINY_CROSS_ATTENTION_DIM
    assert base.tokenizer.model_max_length == 77
    assert base.safety_checker is None
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TINY_BASE_PATH) for f in fs)
    assert size <= 20 * 2**20


def test_unet_projection_layout_follows_sd2(base):
    unet = base.unet
    records = []  # (kind, weight shape, input tokens) in execution order
    handles = []
    for name, module in unet.named_modules():
        kind = next((k for k in KINDS if name.endswith(k)), None)
        if kind is not None and isinstance(module, torch.nn.Linear):
            def hook(mod, args, kind=kind):
                records.append((kind, tuple(mod.weight.shape), args[0].shape[-2]))

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            text = torch.randn(1, 77, TINY_CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(1))
            unet(sample, torch.tensor([500]), text)
    finally:
        for h in handles:
            h.remove()

    assert len(handles) == 128
    assert len(records) == 16 * 8 == 128
    # each transformer block runs attn1 (q, k, v, out) then attn2 (q, k, v, out)
    assert [r[0] for r in records] == KINDS * 16
    for kind in KINDS:
        recs = [r for r in records if r[0] == kind]
        assert len(recs) == 16
        assert runs([r[1] for r in recs]) == (2, 2, 6, 3, 3), kind
    for kind in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
        tokens = [r[2] for r in records if r[0] == kind]
        assert runs(tokens) == (2, 2, 2, 1, 3, 3, 3), kind
        assert tokens[0] == 64 and tokens[6] == 1
    assert {r[2] for r in records if r[0] in ("attn2.to_k", "attn2.to_v")} == {77}
    assert {r[1][1] for r in records if r[0] in ("attn2.to_k", "attn2.to_v")} == {TINY_CROSS_ATTENTION_DIM}


def test_generation_64px_20_steps(base):
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    image = base("a green cartoon creature with big eyes and a long tail", num_inference_steps=20, generator=g).images[0]
    elapsed = time.perf_counter() - t0
    print(f"64px / 20-step generation: {elapsed:.2f}s")
    assert image.size == (64, 64)
    arr = np.asarray(image, dtype=np.float32)
    assert np.isfinite(arr).all() and arr.std() > 5  # not a blank image
    assert elapsed < 60


def test_tokenizer_is_deterministic_and_total():
    assert tiny_bpe_vocab_and_merges() == tiny_bpe_vocab_and_merges()
    tok = build_tiny_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a red circle on the left").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "red</w>", "circle</w>", "on</w>", "the</w>", "left</w>"]
    weird = tok("Zürich 2024: ünïcödé & emoji 🙂 text", truncation=True).input_ids
    assert tok.unk_token_id not in weird[1:-1] and len(weird) > 10
    long = tok("word " * 200, truncation=True, padding="max_length", max_length=77).input_ids
    assert len(long) == 77


def test_pokemon_style_dataset_is_deterministic():
    from datasets import Image as ImageFeature

    from reslora_diffusers.demo.pokemon_style import make_pokemon_style_dataset

    a = make_pokemon_style_dataset(num_samples=6, seed=0, resolution=64)
    b = make_pokemon_style_dataset(num_samples=6, seed=0, resolution=64)
    c = make_pokemon_style_dataset(num_samples=6, seed=1, resolution=64)
    assert a.column_names == ["image", "text"]
    assert isinstance(a.features["image"], ImageFeature)
    arr = lambda ds: np.stack([np.asarray(r["image"].convert("RGB")) for r in ds])  # noqa: E731
    assert a["text"] == b["text"] and np.array_equal(arr(a), arr(b))
    assert a["text"] != c["text"] and not np.array_equal(arr(a), arr(c))
    assert a[0]["image"].size == (64, 64)
    assert all("cartoon creature" in t for t in a["text"])


def test_save_as_imagefolder_roundtrip(tmp_path):
    import datasets

    from reslora_diffusers.demo.pokemon_style import make_pokemon_style_dataset, save_as_imagefolder

    ds = make_pokemon_style_dataset(num_samples=4, seed=3, resolution=32)
    save_as_imagefolder(ds, tmp_path)
    assert (tmp_path / "metadata.jsonl").exists()
    back = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert sorted(back["text"]) == sorted(ds["text"])
    assert back[0]["image"].size == (32, 32)


def test_style_score_separates_domains():
    from reslora_diffusers.demo.pokemon_style import base_style_sample, make_pokemon_style_dataset
    from reslora_diffusers.demo.style_score import style_score, style_scores

    pokemon = [r["image"] for r in make_pokemon_style_dataset(num_samples=24, seed=0, resolution=64)]
    base_images = [base_style_sample(i, seed=0, resolution=64)[0] for i in range(24)]  # the base's training domain
    p, b = style_scores(pokemon), style_scores(base_images)
    assert min(p) > max(b)
    assert style_score(pokemon) - style_score(base_images) > 0.5
