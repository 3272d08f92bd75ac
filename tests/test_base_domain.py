"""The tiny base's creature domain: the base style vs the pokemon-style dataset, the style score,
the fill-colour content check, and stock-diffusers loading of the shipped base."""

import colorsys
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from reslora_diffusers.demo.pokemon_style import (
    COLOR_NAMES,
    PALETTE,
    PASTEL_COLORS,
    SATURATED_COLORS,
    base_style_sample,
    make_pokemon_style_dataset,
    pokemon_style_sample,
)
from reslora_diffusers.demo.style_score import (
    COLOUR_HUES,
    caption_colour,
    fill_colour_match,
    style_components,
    style_scores,
)
from reslora_diffusers.demo.tiny_sd2 import TINY_BASE_PATH
from reslora_diffusers.demo.vae_check import (
    GATE_COLOUR_FRACTION,
    GATE_STYLE_MEAN,
    fill_latent_distances,
    fill_probe,
    round_trip_shortfalls,
    vae_round_trip,
)

REPO = Path(__file__).resolve().parents[1]

# sha256 over (pixels, caption) of pokemon_style_sample(i, seed, res) for seed in (0, 1), i < n,
# computed with the renderer as it was before the anatomy/renderer split (commit 03ff659)
POKEMON_STYLE_HASHES = {
    (64, 100): "8a43bd6a7f5bb378af17d5d6f3adc1d9ae51c5dda7795942a9e23790504e9e4b",
    (128, 30): "ad823324fb2c61da587b72439b6efb5d5a9a72c1bf811fc113d0107f0737b9a0",
    (32, 30): "1102593ad8d37fcc171f6e8815366bb1a0044a354c82656f9c391d14df41460d",
}


def _hash(sample, resolution, n):
    h = hashlib.sha256()
    for seed in (0, 1):
        for i in range(n):
            im, text = sample(i, seed, resolution)
            h.update(np.asarray(im).tobytes())
            h.update(text.encode())
    return h.hexdigest()


@pytest.mark.parametrize("resolution,n", sorted(POKEMON_STYLE_HASHES))
def test_pokemon_style_is_byte_identical_to_the_pre_split_renderer(resolution, n):
    assert _hash(pokemon_style_sample, resolution, n) == POKEMON_STYLE_HASHES[(resolution, n)]


def test_base_style_is_deterministic_and_shares_the_caption_grammar():
    assert _hash(base_style_sample, 64, 10) == _hash(base_style_sample, 64, 10)
    a, ta = base_style_sample(3, 0, 64)
    b, tb = base_style_sample(3, 1, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    base_caps = [base_style_sample(i, 0, 64)[1] for i in range(60)]
    pokemon_caps = [pokemon_style_sample(i, 0, 64)[1] for i in range(60)]
    # own rng names: the base style does not replay the dataset's samples
    assert sum(x == y for x, y in zip(base_caps, pokemon_caps)) < 10
    for cap in base_caps + pokemon_caps:
        assert " cartoon creature with " in cap and ("big eyes" in cap or "small eyes" in cap)
        assert caption_colour(cap) in COLOR_NAMES
    # the same grammar: the base captions use only phrases the dataset's captions use
    phrases = lambda caps: {p.strip() for c in caps for p in c.split(" with ")[1].replace(" and ", ",").split(",")}  # noqa: E731
    assert phrases(base_caps) <= phrases([pokemon_style_sample(i, 0, 64)[1] for i in range(400)])


def test_colour_words_keep_their_hue_across_styles():
    assert sorted(PASTEL_COLORS) == sorted(SATURATED_COLORS) == list(COLOR_NAMES)
    for name in COLOR_NAMES:
        hp, sp, vp = colorsys.rgb_to_hsv(*(c / 255 for c in PASTEL_COLORS[name]))
        hs, ss, vs = colorsys.rgb_to_hsv(*(c / 255 for c in SATURATED_COLORS[name]))
        d = abs(hp - hs) * 360
        assert min(d, 360 - d) < 16, name
        assert ss > 0.75 and sp < 0.5, name


def test_base_style_has_no_outline_and_no_white_or_pastel_background():
    palette = np.asarray(PALETTE, np.float32)
    for i in range(200):
        im, _ = base_style_sample(i, 0, 64)
        arr = np.asarray(im, np.float32)
        assert (arr.max(axis=2) >= 70).all(), i  # no near-black pixel at all (style_score.DARK_THRESHOLD)
        assert style_components(im)["dark_fraction"] == 0.0
        # the background (the 4x4 corners, which the creatures do not reach) is neither white nor pastel
        border = np.concatenate([arr[:4, :4], arr[:4, -4:], arr[-4:, :4], arr[-4:, -4:]]).reshape(-1, 3)
        mx, mn = border.max(axis=1), border.min(axis=1)
        assert (mn < 200).all(), i
        assert ((mx - mn) / mx >= 0.3).all(), i
        dist = np.sqrt(((border[:, None] - palette[None]) ** 2).sum(-1)).min(axis=1)
        assert (dist > 45).all(), i


def test_style_score_separates_base_style_from_dataset():
    pokemon = [r["image"] for r in make_pokemon_style_dataset(num_samples=60, seed=0, resolution=64)]
    base = [base_style_sample(i, 0, 64)[0] for i in range(60)]
    p, b = style_scores(pokemon), style_scores(base)
    assert min(p) > max(b)
    assert np.mean(p) - np.mean(b) > 0.8


def _disc(rgb, background=(255, 255, 255), outline=None, size=64):
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).ellipse([16, 16, 48, 48], fill=rgb, outline=outline, width=3 if outline else 0)
    return img


def _hsv(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((h % 360) / 360, s, v))


def test_fill_colour_match_on_images_of_known_colour():
    # independent expectation: discs of a known hue, pastel or saturated, outlined on white, or plain on
    # a coloured background far in hue or of the same hue but darker; each reference hue +-10 degrees
    # names itself
    for name in COLOR_NAMES:
        h = COLOUR_HUES[name]
        for dh in (-10, 0, 10):
            for fill, bg, outline in ((_hsv(h + dh, 0.35, 1.0), (255, 255, 255), (20, 20, 20)),
                                      (_hsv(h + dh, 0.9, 0.9), _hsv(h + 180, 0.8, 0.5), None),
                                      (_hsv(h + dh, 0.9, 0.9), _hsv(h, 0.7, 0.35), None)):  # same hue, darker
                r = fill_colour_match(_disc(fill, bg, outline), name)
                assert r["match"] and r["nearest"] == name and r["fraction"] > 0.95, (name, dh, r)
                others = [n for n in COLOR_NAMES if n != name]
                assert not fill_colour_match(_disc(fill, bg, outline), others[0])["match"]
    blank = fill_colour_match(Image.new("RGB", (64, 64), (255, 255, 255)), "green")
    assert blank == {"fraction": 0.0, "nearest": None, "num_fill_pixels": 0, "match": False}
    with pytest.raises(ValueError):
        fill_colour_match(_disc((0, 200, 0)), "red")


def test_fill_colour_match_on_rendered_creatures():
    for sample in (pokemon_style_sample, base_style_sample):
        fractions = []
        for i in range(100):  # includes creatures whose feet and ears reach into the border strip
            im, cap = sample(i, 0, 64)
            r = fill_colour_match(im, caption_colour(cap))
            assert r["match"], (sample.__name__, i, cap, r)
            fractions.append(r["fraction"])
        assert np.mean(fractions) > 0.85, sample.__name__


def test_shipped_base_loads_in_stock_diffusers_without_reslora(tmp_path):
    """The shipped base generates with ``StableDiffusionPipeline.from_pretrained(path)`` (no torch_dtype),
    in a subprocess in which importing reslora_diffusers is blocked."""
    if not os.path.isdir(TINY_BASE_PATH):
        pytest.fail(f"shipped base missing at {TINY_BASE_PATH}")
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "reslora_diffusers" or name.startswith("reslora_diffusers."):
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({TINY_BASE_PATH!r})
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a green cartoon creature with big eyes", num_inference_steps=5, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        arr = np.asarray(image, dtype=np.float32)
        print(json.dumps({{"size": list(image.size), "std": float(arr.std()),
                          "dtypes": [str(pipe.unet.dtype), str(pipe.vae.dtype), str(pipe.text_encoder.dtype)],
                          "leaked": sorted(m for m in sys.modules if m.startswith("reslora_diffusers"))}}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert result["size"] == [64, 64] and result["std"] > 5


class _PixelAutoencoder(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself; ``decode`` applies ``colour_map`` (NCHW -> NCHW)."""

    def __init__(self, colour_map=lambda x: x):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype
        self.colour_map = colour_map

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=self.colour_map(z))


def test_vae_round_trip_of_a_lossless_autoencoder_scores_the_dataset_itself():
    n = 40
    result = vae_round_trip(_PixelAutoencoder(), n=n, resolution=64)
    # independent: score the dataset images directly and count their colour words from the captions
    pairs = [pokemon_style_sample(i, 0, 64) for i in range(n)]
    direct = style_scores([im for im, _ in pairs])
    assert result["style_mean"] == pytest.approx(np.mean(direct), abs=1e-6)
    assert result["style_min"] == pytest.approx(min(direct), abs=1e-6)
    counts = Counter(caption_colour(cap) for _, cap in pairs)
    assert result["colour_matched"] == {c: [k, k] for c, k in sorted(counts.items())}
    assert round_trip_shortfalls(result, GATE_COLOUR_FRACTION, GATE_STYLE_MEAN) == []


def test_fill_latent_distances_of_a_pixel_autoencoder_are_the_colour_distances():
    colours = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (250, 250, 250)}
    # outlined on white, like the dataset: averaging any outline or background pixel into a fill would show
    result = fill_latent_distances(_PixelAutoencoder(), colours, background=(255, 255, 255), outline=(20, 20, 20))
    for (x, y), dist in result["distances"].items():  # independent: the pixels in [-1, 1] are the latent
        expected = np.linalg.norm((np.array(colours[x]) - np.array(colours[y])) / 127.5)
        assert dist == pytest.approx(expected, rel=1e-5)
    assert sorted(result["distances"]) == [("a", "b"), ("a", "c"), ("b", "c")]


def test_fill_latent_distances_names_what_each_probe_decodes_as():
    colours = {name: PASTEL_COLORS[name] for name in ("blue", "orange", "green")}
    kept = fill_latent_distances(_PixelAutoencoder(), colours, outline=(20, 20, 20))["decoded"]
    assert kept == {"blue": "blue", "orange": "orange", "green": "green"}
    # a decoder that swaps red and blue: pastel blue (160, 205, 255) comes back (255, 205, 160), orange's hue
    swapped = fill_latent_distances(_PixelAutoencoder(lambda x: x[:, [2, 1, 0]]), colours, outline=(20, 20, 20))
    assert swapped["decoded"]["blue"] == "orange" and swapped["decoded"]["green"] == "green"
    # the probe's interior is the fill only: every interior pixel has the fill colour, and it is most of the image
    image, interior = fill_probe((10, 200, 30), (255, 255, 255), (20, 20, 20), size=64)
    pixels = np.asarray(image)
    assert (pixels[interior] == (10, 200, 30)).all() and 0.4 < interior.mean() < 0.8


def test_vae_round_trip_catches_a_decoder_that_shifts_colours():
    # swapping red and blue turns pastel blue into orange-ish and orange into blue, keeps the outlines
    result = vae_round_trip(_PixelAutoencoder(lambda x: x[:, [2, 1, 0]]), n=40, resolution=64)
    assert result["colour_matched"]["blue"][0] == 0 and result["colour_matched"]["orange"][0] == 0
    problems = round_trip_shortfalls(result, GATE_COLOUR_FRACTION, GATE_STYLE_MEAN)
    assert any(p.startswith("blue: 0/") for p in problems) and any(p.startswith("orange: 0/") for p in problems)
    # a washed-out decoder (everything halfway to white) loses the outlines: the style bar names it
    faded = vae_round_trip(_PixelAutoencoder(lambda x: 0.5 * x + 0.5), n=20, resolution=64)
    assert any(p.startswith("style score mean") for p in round_trip_shortfalls(faded, 0.0, GATE_STYLE_MEAN))


def test_shipped_base_vae_passes_the_build_gate():
    """The shipped VAE keeps the dataset's look (every colour word, outlines) as the build required."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TINY_BASE_PATH, subfolder="vae").float().eval()
    result = vae_round_trip(vae, n=200, resolution=64)
    assert round_trip_shortfalls(result, GATE_COLOUR_FRACTION, GATE_STYLE_MEAN) == [], result


def test_base_build_stops_before_the_unet_when_the_vae_fails_the_gate(tmp_path):
    # 4 VAE steps cannot keep any colour: the build must say so and write nothing
    out = tmp_path / "base"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_base.py"), "--out", str(out), "--vae-steps", "4",
         "--colour-stage-steps", "2", "--unet-steps", "4", "--num-images", "32", "--num-clutter", "8", "--num-outlined", "8", "--gate-images", "12",
         "--threads", "1"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert proc.returncode != 0
    assert "The trained VAE loses the pokemon-style look" in proc.stderr and "--vae-steps" in proc.stderr
    assert "VAE round trip of 12 pokemon-style images" in proc.stdout
    assert "unet:" not in proc.stderr  # the UNet's progress bar never started
    assert not out.exists()


def _load_build_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_base", REPO / "scripts" / "build_tiny_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakePipe:
    """Stands in for the pipeline in ``save_base``: writes one file per save, then optionally fails."""

    def __init__(self, content: str, fail: BaseException | None = None):
        self.content, self.fail = content, fail
        self.unet = self.vae = self.text_encoder = torch.nn.Linear(1, 1)
        self.scheduler = None

    def save_pretrained(self, directory, safe_serialization=True):
        Path(directory, "unet").mkdir(parents=True, exist_ok=True)
        Path(directory, "unet", "weights.txt").write_text(self.content)
        if self.fail is not None:
            raise self.fail

    def to(self, dtype):
        return self


@pytest.mark.parametrize("fail", [KeyboardInterrupt(), OSError("disk full")], ids=["ctrl-c", "oserror"])
def test_base_save_interrupted_midway_keeps_the_previous_base(tmp_path, fail):
    build = _load_build_script()
    out = tmp_path / "base"
    args = SimpleNamespace(out=str(out), fp32=False)
    build.save_base(_FakePipe("old"), args)
    assert (out / "unet" / "weights.txt").read_text() == "old" and (out / "tokenizer" / "vocab.json").is_file()
    with pytest.raises(type(fail)):
        build.save_base(_FakePipe("new", fail=fail), args)
    # the previous base is untouched and complete; nothing half-written sits at --out
    assert (out / "unet" / "weights.txt").read_text() == "old" and (out / "tokenizer" / "vocab.json").is_file()
    build.save_base(_FakePipe("new"), args)  # the next save cleans up the leftover .partial folder
    assert (out / "unet" / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_latent_separation_loss_is_the_hinge_on_fill_distances_written_out():
    build = _load_build_script()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 3, 8, 8, generator=gen)
    cells = torch.rand(4, 8, 8, generator=gen) < 0.5
    spread, margin = torch.tensor(0.7), 4.0
    # independent: each fill's latent is the plain mean of its interior cells' vectors, then a loop over pairs
    fills = []
    for n in range(4):
        vectors = [latents[n, :, r, c] for r in range(8) for c in range(8) if cells[n, r, c]]
        fills.append(torch.stack(vectors).mean(0) / spread)
    hinges = [max(0.0, margin - float((fills[a] - fills[b]).norm())) ** 2 for a in range(4) for b in range(a + 1, 4)]
    got = build.latent_separation_loss(latents, cells, spread, margin)
    assert float(got) == pytest.approx(sum(hinges) / len(hinges), rel=1e-5) and float(got) > 0
    # fills already farther apart than the margin cost nothing, so reconstruction alone shapes them
    assert float(build.latent_separation_loss(latents, cells, spread, 0.01)) == 0.0


def test_fill_probes_are_one_per_style_colour_and_draw_the_named_colour():
    build = _load_build_script()
    args = SimpleNamespace(seed=0, probes_per_colour=3)
    probes = build.render_probes(args)
    assert sorted(probes) == ["pastel", "saturated"]
    for style, (images, cells) in probes.items():
        colours = PASTEL_COLORS if style == "pastel" else SATURATED_COLORS
        assert images.shape == (len(COLOR_NAMES) * 3, 3, 64, 64) and cells.shape == (len(COLOR_NAMES) * 3, 8, 8)
        for k, name in enumerate(COLOR_NAMES):  # colour-major: probes 3k..3k+2 are the k-th colour word
            for i in range(3 * k, 3 * k + 3):
                assert cells[i].sum() >= 4
                # every pixel of every interior latent cell is the fill colour
                block = cells[i].repeat_interleave(8, 0).repeat_interleave(8, 1)
                pixels = images[i].permute(1, 2, 0)[block]
                assert (pixels == torch.tensor(colours[name], dtype=torch.uint8)).all()
