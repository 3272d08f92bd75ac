"""Where SD users are: the kohya-format export, samples in tensorboard and from the exported file, the
upstream example's flags, SD 1.5 / SDXL UNet layouts and text-encoder ResLoRA.

Two short runs of the training script (``bs``, and ``is`` with ``--train_text_encoder``, tensorboard on) serve
most tests. Stock-load
checks run in a fresh interpreter in which ``reslora_diffusers`` cannot be imported.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_train_script import QUICK, ROOT, cli_error, run_script, train

from reslora_diffusers.integrations import sd_training

RANK = 4  # the script's default --rank, used by the runs below
# SD2's transformer blocks in execution order (down, mid, up) and their runs of equal weight shape
SD2_RUNS = (2, 2, 6, 3, 3)


def runs(seq):
    """Lengths of the runs of consecutive equal items."""
    return tuple(len(list(g)) for _, g in groupby(seq))


def run_stock(code, timeout=300):
    """Run ``code`` in a fresh interpreter where importing reslora_diffusers fails; returns its last stdout line
    parsed as JSON. The snippet must print one JSON line."""
    prelude = textwrap.dedent("""
        import importlib.abc, json, sys
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "reslora_diffusers" or name.startswith("reslora_diffusers."):
                    raise ImportError("reslora_diffusers is blocked: this check uses stock diffusers only")
        sys.meta_path.insert(0, _Block())
    """)
    epilogue = "\nassert not any(m.startswith('reslora_diffusers') for m in sys.modules), 'reslora_diffusers was imported'\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd="/", env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TINY_BASE = str(ROOT / "reslora_diffusers" / "demo" / "assets" / "tiny-sd2-base")

STOCK_UNET_OUTPUTS = textwrap.dedent("""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    calib = load_file(RUN + "/reslora_calibration.safetensors")
    batch = [calib[f"1.{k}"] for k in ("noisy_latents", "timesteps", "encoder_hidden_states")]
    out = {}
    for name in [None, *FILES]:
        pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, dtype=torch.float32)
        if name:
            pipe.load_lora_weights(RUN, weight_name=name)
        with torch.no_grad():
            out[name] = pipe.unet(batch[0], batch[1], encoder_hidden_states=batch[2]).sample
    ref = out[FILES[0]]
    print(json.dumps({
        "lora_effect": ((ref - out[None]).norm() / out[None].norm()).item(),
        "relative_differences": [((out[n] - ref).norm() / ref.norm()).item() for n in FILES[1:]],
    }))
""")


@pytest.fixture(scope="module")
def runs_tb(tmp_path_factory):
    """One bs (pre_num 2) and one is run with the text encoder, both formats, tensorboard on."""
    out = {}
    for structure in ("bs", "is"):
        run_dir = tmp_path_factory.mktemp(f"eco-{structure}")
        extra = ["--pre_num", "2"] if structure == "bs" else ["--train_text_encoder"]
        proc = run_script(["--output_dir", str(run_dir), "--reslora_structure", structure, *extra, *QUICK,
                           "--report_to", "tensorboard"])
        (run_dir / "launch.log").write_text(proc.stdout + proc.stderr)
        out[structure] = run_dir
    return out


def test_run_with_the_text_encoder_reports_both_merges(runs_tb):
    log = (runs_tb["is"] / "launch.log").read_text()
    report = json.loads((runs_tb["is"] / "merge_report.json").read_text())
    for title, noun, part in (("UNet", "UNet", report), ("Text encoder", "text encoder", report["text_encoder"])):
        held = part["held_out"]["relative_output_error"]
        assert f"{title} merge 'ls': on held-out batches the export's {noun} output differs from the trained " \
               f"model's by {100 * held:.1f}%." in log


# ------------------------------------------------------------------------------------- kohya export
@pytest.mark.parametrize("structure", ["bs", "is"])
def test_kohya_file_loads_in_stock_diffusers_like_the_diffusers_file(runs_tb, structure):
    run_dir = runs_tb[structure]
    files = ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"]
    result = run_stock(f"RUN, BASE, FILES = {str(run_dir)!r}, {TINY_BASE!r}, {files!r}\n" + STOCK_UNET_OUTPUTS)
    assert result["lora_effect"] > 1e-3  # the LoRA changes the output
    assert result["relative_differences"][0] < 1e-5


@pytest.mark.parametrize("structure", ["bs", "is"])
def test_kohya_keys_ranks_and_alpha(runs_tb, structure):
    diffusers_file = load_file(str(runs_tb[structure] / "pytorch_lora_weights.safetensors"))
    kohya = load_file(str(runs_tb[structure] / "pytorch_lora_weights_kohya.safetensors"))
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_"}  # kohya's names of the two parts
    assert {k.split(".", 1)[1] for k in kohya} == {"lora_down.weight", "lora_up.weight", "alpha"}
    modules = {k.rsplit(".lora_", 1)[0] for k in diffusers_file}
    assert {m.split(".")[0] for m in modules} == ({"unet", "text_encoder"} if structure == "is" else {"unet"})
    to_kohya = {m: kohya_prefix[m.split(".")[0]] + m.split(".", 1)[1].replace(".", "_") for m in modules}
    assert {k.split(".")[0] for k in kohya} == set(to_kohya.values())
    ranks = {}
    for m, k in to_kohya.items():
        a, b = diffusers_file[f"{m}.lora_A.weight"], diffusers_file[f"{m}.lora_B.weight"]
        down, up, alpha = kohya[f"{k}.lora_down.weight"], kohya[f"{k}.lora_up.weight"], kohya[f"{k}.alpha"].item()
        ranks[m] = down.shape[0]
        assert down.shape == a.shape and up.shape == b.shape
        # what ComfyUI/A1111/diffusers apply (scale alpha / rank) is the diffusers file's B A
        torch.testing.assert_close(alpha / down.shape[0] * up @ down, b @ a, rtol=1e-5, atol=1e-7)
    # every projection kind follows SD2's runs of equal weight shape; bs with pre_num 2 concatenates up to 3 blocks
    expected = sorted(RANK * min(i + 1, 3) for n in SD2_RUNS for i in range(n)) * 8 if structure == "bs" else [RANK] * 128
    assert sorted(r for m, r in ranks.items() if m.startswith("unet.")) == sorted(expected)
    if structure == "is":  # 2 CLIP layers x 4 projections, under transformers 4's names as SD LoRAs have them
        assert sorted(m for m in ranks if m.startswith("text_encoder.")) == sorted(
            f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}" for i in range(2)
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    alphas = {kohya[k].item() for k in kohya if k.endswith(".alpha")}
    assert len(alphas) == 1  # one alpha: diffusers 0.42 keeps only the most common per-module alpha


def test_merge_cli_export_format_and_text_encoder(runs_tb, tmp_path):
    out = tmp_path / "kohya-only"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "reslora_diffusers.integrations.merge", str(runs_tb["is"]), "--merge", "ls", "--export_format",
         "kohya", "--output_dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights_kohya.safetensors").exists()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    a = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    b = load_file(str(runs_tb["is"] / "pytorch_lora_weights_kohya.safetensors"))
    assert any(k.startswith("lora_te1_") for k in a)  # the text encoder is re-merged too
    assert a.keys() == b.keys()
    for k in (k for k in a if k.endswith(".lora_down.weight")):  # the same ls merge on the same calibration set
        module = k[: -len(".lora_down.weight")]
        delta_a, delta_b = (f[f"{module}.lora_up.weight"] @ f[k] for f in (a, b))
        assert ((delta_a - delta_b).norm() / delta_b.norm()).item() < 1e-3, module  # a least-squares fit: float noise


# --------------------------------------------------------------------- stock diffusers, as a new user does it
def test_shipped_base_generates_in_stock_diffusers_with_no_extra_arguments():
    """from_pretrained(path) with no torch_dtype, then a prompt: every weight comes out fp32 and an image comes out."""
    size = json.loads((Path(TINY_BASE) / "unet" / "config.json").read_text())["sample_size"] * 8
    out = run_stock(f"""
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({TINY_BASE!r})
        image = pipe("a green cartoon creature with big eyes", num_inference_steps=4).images[0]
        dtypes = sorted({{str(p.dtype) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}})
        print(json.dumps({{"size": list(image.size), "dtypes": dtypes}}))
    """)
    assert out == {"size": [size, size], "dtypes": ["torch.float32"]}


def test_model_card_snippet_runs_verbatim_and_draws_the_grids_export_sample(runs_tb):
    """The "How to use" code of the card a run writes, exactly as written, in stock diffusers: it draws the image
    the progress grid shows for the first prompt in its export column (what the user saw is what the snippet
    gives; the pipeline's defaults would sample at 50 steps and guidance 7.5)."""
    run = runs_tb["bs"]
    card = (run / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from_pretrained(" in snippet and "load_lora_weights(" in snippet
    out = run_stock(snippet + "\nimport numpy\nprint(json.dumps({'pixels': numpy.asarray(image).tolist()}))\n",
                    timeout=900)
    drawn = np.asarray(out["pixels"], dtype=np.float32)
    shown, base = pngs(run / "samples" / "export")[0], pngs(run / "samples" / "step-000000")[0]  # prompt 0, seed 0
    assert drawn.shape == shown.shape
    # fused vs unfused LoRA differ in float order only: far closer than the 4-step fine-tune moved the sample
    assert np.abs(drawn - shown).mean() < 0.25 * np.abs(shown - base).mean(), np.abs(drawn - shown).mean()


# ----------------------------------------------------------------------- samples from the export
def pngs(folder):
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(folder.glob("prompt-*.png"))]


@pytest.mark.parametrize("structure", ["bs", "is"])
def test_export_column_equals_the_last_merged_snapshot(runs_tb, structure):
    samples = runs_tb[structure] / "samples"
    export, last = pngs(samples / "export"), pngs(samples / "step-000004")
    first = pngs(samples / "step-000000")
    assert len(export) == len(last) == 3
    for e, m, f in zip(export, last, first):
        assert np.abs(e - m).mean() <= 1.0  # within sampling tolerance (8-bit images, float order)
        assert np.abs(e - f).mean() > 4 * max(np.abs(e - m).mean(), 0.05)  # and the training changed them
    grid = Image.open(runs_tb[structure] / "progress_grid.png")
    assert grid.width > 4 * 64  # steps 0, 2, 4 and export


# ----------------------------------------------------------------------------------- tensorboard
def test_tensorboard_event_file_has_the_snapshots_grid_and_export(runs_tb):
    import io

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    run_dir = runs_tb["is"]
    logs = [d for d, _, files in os.walk(run_dir / "logs") if any(f.startswith("events.out.tfevents") for f in files)]
    assert logs
    images = {}
    for log in logs:
        acc = EventAccumulator(log, size_guidance={IMAGES: 0})
        acc.Reload()
        for tag in acc.Tags()[IMAGES]:
            images.setdefault(tag, []).extend(acc.Images(tag))
    assert sorted(e.step for e in images["samples"]) == [0, 2, 4]
    assert [e.step for e in images["export"]] == [4]
    assert sorted(e.step for e in images["progress_grid"]) == [0, 2, 4, 4]
    # the logged snapshot is the three saved images side by side
    step2 = next(e for e in images["samples"] if e.step == 2)
    logged = np.asarray(Image.open(io.BytesIO(step2.encoded_image_string)).convert("RGB"), dtype=np.float32)
    saved = np.concatenate(pngs(run_dir / "samples" / "step-000002"), axis=1)
    assert logged.shape == saved.shape and np.abs(logged - saved).max() == 0


# ------------------------------------------------------------------------------------ upstream flags
def test_flags_needing_absent_features_fail_before_the_model_loads(monkeypatch, capsys):
    import importlib.util

    def no_model(args):
        raise AssertionError("the model was loaded before the flag check")

    monkeypatch.setattr(train, "load_components", no_model)
    monkeypatch.setattr(train, "load_raw_dataset", no_model)
    for flag, package in (("--use_8bit_adam", "bitsandbytes"), ("--enable_xformers_memory_efficient_attention", "xformers")):
        err = cli_error([flag, "--report_to", "none"], capsys)
        if importlib.util.find_spec(package) is None:
            assert f"{flag} needs {package}, which is not installed" in err
        else:
            assert f"{flag} needs a CUDA GPU" in err or torch.cuda.is_available()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    err = cli_error(["--push_to_hub", "--report_to", "none"], capsys)
    assert "--push_to_hub needs the Hugging Face hub, but HF_HUB_OFFLINE is set" in err


def test_push_to_hub_without_network_fails_clearly(monkeypatch, capsys):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "create_repo", unreachable)
    monkeypatch.setattr(train, "load_components", lambda args: pytest.fail("model loaded before the hub check"))
    err = cli_error(["--push_to_hub", "--hub_model_id", "me/reslora-test", "--report_to", "none"], capsys)
    assert "could not create the hub repository 'me/reslora-test'" in err and "ConnectionError" in err


def test_image_interpolation_mode_is_the_pil_filter():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for mode, pil in (("lanczos", Image.Resampling.LANCZOS), ("nearest", Image.Resampling.NEAREST),
                      ("bicubic", Image.Resampling.BICUBIC)):
        args = train.parse_args(["--image_interpolation_mode", mode, "--resolution", "16", "--center_crop"])
        got = sd_training.transform_image(image, 16, True, False, rng, args.image_interpolation_mode)
        expected = np.asarray(image.resize((16, 16), pil), dtype=np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert train.parse_args([]).image_interpolation_mode == "bilinear"  # this script's default (upstream: lanczos)


def test_validation_epochs_samples_at_epoch_ends(tmp_path):
    # 16 images, batch 4: 4 steps per epoch; 8 steps; sample_steps 100 -> snapshots at 0, the end of epoch 1 and 2
    run_script(["--output_dir", str(tmp_path), "--max_train_steps", "8", "--sample_steps", "100", "--validation_epochs",
                "1", "--train_batch_size", "4", "--pokemon_style_size", "16", "--sample_num_inference_steps", "1",
                "--calibration_batches", "1", "--report_to", "none", "--checkpointing_steps", "100",
                "--export_format", "diffusers"])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["export", "step-000000", "step-000004", "step-000008"]
    assert not (tmp_path / "pytorch_lora_weights_kohya.safetensors").exists()


def test_script_refuses_an_sdxl_pipeline(tmp_path, capsys):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    err = cli_error(["--pretrained_model_name_or_path", str(tmp_path / "sdxl"), "--report_to", "none",
                     "--output_dir", str(tmp_path / "o")], capsys)
    assert "SDXL (two text encoders, time ids) is not supported by this script yet" in err


# ---------------------------------------------------------------------------------- SD 1.5 and SDXL
# The real unet/config.json of SD 1.5 and SDXL base, with widths divided by 10 (and SDXL's head counts by 5, so
# that heads divide the widths) and 16x16 latents, to fit a shared 2-core machine. Block types, layers per
# block, transformer layers per block, cross-attention width, linear projections and SDXL's text-time
# embedding are the real ones, so the chain structure is the real one.
SD15_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(1, 2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
LAYOUTS = {  # config, expected runs of equal weight shape (bs), of equal input shape (is)
    "sd15": (SD15_UNET, [2, 2, 6, 3, 3], [2, 2, 2, 1, 3, 3, 3]),
    "sdxl": (SDXL_UNET, [4, 60, 6], [4, 60, 6]),  # SDXL's mid block runs at its last down block's size
}
READS_TEXT = ("attn2.to_k", "attn2.to_v")  # their input is the text, of one shape in every block


def transformer_blocks(config):
    """(channels, tokens) of every transformer block in execution order (down, mid, up), from the config alone."""
    channels, n = list(config["block_out_channels"]), len(config["block_out_channels"])
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * n
    side, blocks = config["sample_size"], []
    for i, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [(channels[i], side * side)] * (config["layers_per_block"] * depth[i])
        if i < n - 1:
            side //= 2
    blocks += [(channels[-1], side * side)] * depth[-1]
    for j, kind in enumerate(config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [(channels[::-1][j], side * side)] * ((config["layers_per_block"] + 1) * depth[::-1][j])
        if j < n - 1:
            side *= 2
    return blocks


def layout_inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    args = (torch.randn(1, 4, size, size, generator=g), torch.tensor([500]),
            torch.randn(1, 77, config["cross_attention_dim"], generator=g))
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return args, extra


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chains_trace_on_sd15_and_sdxl_unets_and_exports_load_back(layout, tmp_path):
    from diffusers import UNet2DConditionModel
    from tiny_models import UNET_TARGETS, randomize_lora

    from reslora_diffusers import ResLoRAConfig, inject_reslora, merge_reslora
    from reslora_diffusers.core.model import get_controller
    from reslora_diffusers.core.export import save_pipeline_lora

    config, weight_runs, input_runs = LAYOUTS[layout]
    blocks = transformer_blocks(config)
    assert list(runs([c for c, _ in blocks])) == weight_runs and list(runs(blocks)) == input_runs
    (args, extra) = layout_inputs(config)
    torch.manual_seed(0)
    UNet2DConditionModel(**config).save_pretrained(tmp_path / "base")
    for structure in ("is", "bs"):
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "base").eval()
        inject_reslora(unet, ResLoRAConfig(structure=structure, pre_num=1, r=2, lora_alpha=4, target_modules=UNET_TARGETS))
        randomize_lora(unet, scale=0.05)
        with torch.no_grad():
            unmerged = unet(*args, **extra).sample
        chains = get_controller(unet).chain_summary()
        assert len(chains) == 8 and all(len(c["order"]) == len(blocks) for c in chains.values())
        for kind, chain in chains.items():
            if structure == "bs":  # links equal weight shapes
                expected = weight_runs
            else:  # links equal input shapes: the text is one shape for every block
                expected = [len(blocks)] if kind.endswith(READS_TEXT) else input_runs
            assert chain["segments"] == expected, (layout, structure, kind)
    result = merge_reslora(unet)  # bs: exact
    assert sorted(set(result.ranks().values())) == [2, 4]
    save_pipeline_lora({"unet": result}, str(tmp_path), "both")
    torch.save({"args": args, "extra": extra, "unmerged": unmerged}, tmp_path / "io.pt")
    pipeline = "StableDiffusionXLPipeline" if layout == "sdxl" else "StableDiffusionPipeline"
    result = run_stock(f"""
        import torch
        from diffusers import UNet2DConditionModel, {pipeline} as Pipeline
        io = torch.load({str(tmp_path / "io.pt")!r})
        errors = {{}}
        for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
            unet = UNet2DConditionModel.from_pretrained({str(tmp_path / "base")!r}).eval()
            state, alphas = Pipeline.lora_state_dict({str(tmp_path)!r}, weight_name=name)
            Pipeline.load_lora_into_unet(state, alphas, unet)
            with torch.no_grad():
                out = unet(*io["args"], **io["extra"]).sample
            errors[name] = ((out - io["unmerged"]).norm() / io["unmerged"].norm()).item()
        print(json.dumps(errors))
    """)
    assert max(result.values()) < 1e-5, result


# ---------------------------------------------------------------------------------- text encoder
def test_text_encoder_export_changes_it_and_a_stock_load_reproduces_the_merged_model(runs_tb, tmp_path):
    from reslora_diffusers import load_training_state, merged_view
    from reslora_diffusers.integrations.sd_run import TEXT_ENCODER_STATE_DIR, load_text_calibration, merge_unet, text_encoder_forward
    from reslora_diffusers.demo.tiny_sd2 import load_tiny_base

    run_dir = runs_tb["is"]
    text_batches = load_text_calibration(str(run_dir))
    ids = text_batches[-1][0]
    text_encoder = load_tiny_base().text_encoder
    load_training_state(text_encoder, str(run_dir / TEXT_ENCODER_STATE_DIR))
    result = merge_unet(text_encoder.eval(), "ls", text_batches, forward_fn=text_encoder_forward)
    with torch.no_grad(), merged_view(text_encoder, result):
        merged = text_encoder(ids)[0]
    torch.save(ids, tmp_path / "ids.pt")
    stock = run_stock(f"""
        import torch
        from diffusers import StableDiffusionPipeline
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        outputs = {{}}
        for name in (None, "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
            pipe = StableDiffusionPipeline.from_pretrained({TINY_BASE!r}, safety_checker=None, dtype=torch.float32)
            if name:
                pipe.load_lora_weights({str(run_dir)!r}, weight_name=name)
            with torch.no_grad():
                outputs[str(name)] = pipe.text_encoder(ids)[0]
        torch.save(outputs, {str(tmp_path / "stock.pt")!r})
        print(json.dumps(sorted(outputs)))
    """)
    outputs = torch.load(tmp_path / "stock.pt")
    assert len(stock) == 3
    base = outputs.pop("None")
    for name, out in outputs.items():
        assert ((out - base).norm() / base.norm()).item() > 1e-3, name  # the export changes the text encoder
        torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)  # as the merged model computes
