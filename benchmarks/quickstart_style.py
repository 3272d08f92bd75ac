"""Measure a training run's snapshots: style score and prompt colour, per step, beside the dataset and the base style.

    python -m benchmarks.quickstart_style runs/quickstart [--num_reference 200] [--json out.json]

For every snapshot folder of the run (``samples/step-N`` and ``samples/export``) and every sample in it (the
run's fixed prompts x seeds):

- ``style``: ``style_score`` (outline + palette cues of the ``pokemon-style`` dataset, in [0, 1]);
- ``colour``: ``fill_colour_match`` against the prompt's colour word: the fraction of the creature's fill
  pixels (inside the outline: not near-black, not white, away from a coloured background) whose nearest
  colour word is the prompt's, and whether the most common one is the prompt's.

Step 0 is the base model (the LoRA starts at zero). For reference it also scores ``--num_reference`` images of
the dataset (``pokemon-style``) and of the base's pretraining style, at the run's resolution.

``--vae_round_trip N`` also encodes and decodes N dataset images with the run's base VAE (the embedded base's
unless the run names another): the look a fine-tune can reach at best, per colour word.

``--colour_sweep N`` also loads the base and the run's exported LoRA as a user does (stock
``StableDiffusionPipeline`` + ``load_lora_weights``) and samples every colour word, not only the sample
prompts', in ``colour_sweep_prompt`` at seeds 0..N-1 (the run's resolution and guidance, 20 steps):
how many samples keep the prompt's colour, per colour word, before and after the fine-tune.

``--latent_distances`` also prints how far apart the base's VAE puts the fills of each pair of colour words
(``fill_latent_distances``): the dataset's pastels (a large outlined ellipse on white) and the base's saturated
fills (on a dark background), and which colour word each probe comes back as after the VAE's encode/decode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from reslora_diffusers.demo.pokemon_style import (
    COLOR_NAMES,
    base_style_sample,
    pokemon_style_sample,
    with_article,
)
from reslora_diffusers.demo.style_score import caption_colour, fill_colour_match, style_score_image
from reslora_diffusers.demo.tiny_sd2 import TINY_BASE_PATH
from reslora_diffusers.demo.vae_check import PROBE_STYLES, fill_latent_distances, vae_round_trip


def snapshot_folders(run: Path) -> list[tuple[str, Path]]:
    """(label, folder) of every snapshot, in step order, then the export."""
    steps = sorted((run / "samples").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    folders = [(f"step {int(p.name.split('-')[1])}", p) for p in steps]
    if (run / "samples" / "export").is_dir():
        folders.append(("export", run / "samples" / "export"))
    if not folders:
        raise SystemExit(f"{run} has no samples/step-* folders: pass the --output_dir of a training run.")
    return folders


def measure_folder(folder: Path) -> dict:
    """Style score and colour match of every sample in one snapshot folder."""
    meta = json.loads((folder / "prompts.json").read_text())
    samples = []
    for i, prompt in enumerate(meta["prompts"]):
        colour = caption_colour(prompt)
        for seed in meta["seeds"]:
            image = Image.open(folder / f"prompt-{i:02d}_seed-{seed}.png").convert("RGB")
            row = {"prompt": prompt, "seed": seed, "style": style_score_image(image)}
            if colour is not None:
                match = fill_colour_match(image, colour)
                row.update(colour=colour, colour_fraction=match["fraction"], colour_nearest=match["nearest"],
                           colour_match=match["match"])
            samples.append(row)
    coloured = [s for s in samples if "colour" in s]
    return {"samples": samples, "style_mean": float(np.mean([s["style"] for s in samples])),
            "colour_matches": sum(s["colour_match"] for s in coloured), "colour_checked": len(coloured)}


def reference_scores(sample_fn, n: int, resolution: int) -> dict:
    scores = [style_score_image(sample_fn(i, 0, resolution)[0]) for i in range(n)]
    return {"n": n, "min": float(np.min(scores)), "mean": float(np.mean(scores)), "max": float(np.max(scores))}


def base_vae_round_trip(base_path: str, n: int, resolution: int) -> dict:
    """``vae_round_trip`` of the base's VAE, loaded as a user loads it (fp32)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base_path, subfolder="vae").float().eval()
    return vae_round_trip(vae, n, resolution)


#: the colour sweep's prompt: the second default sample prompt, with each colour word (and its article) in turn
COLOUR_SWEEP_TEMPLATE = "{} cartoon creature with big eyes and round ears"


def colour_sweep_prompt(colour: str) -> str:
    """The sweep's prompt for ``colour``, in the captions' grammar ("an orange ...", never "a orange ...")."""
    return COLOUR_SWEEP_TEMPLATE.format(with_article(colour))


def run_config(run: Path) -> dict:
    return json.loads((run / "reslora_run.json").read_text()).get("config", {})


def sweep_colours(pipe, num_seeds: int, resolution: int, guidance: float) -> dict:
    """Per colour word: how many of ``num_seeds`` samples of ``pipe`` keep the prompt's colour, what colour words the
    samples come back as (``fill_colour_match``'s nearest; None: no fill pixels), and their mean style score
    (``colour_sweep_prompt`` at seeds 0..N-1, 20 steps)."""
    import torch

    out = {}
    for colour in COLOR_NAMES:
        kept, styles, came_back_as = 0, [], {}
        for seed in range(num_seeds):
            image = pipe(colour_sweep_prompt(colour), num_inference_steps=20, guidance_scale=guidance,
                         height=resolution, width=resolution, generator=torch.Generator().manual_seed(seed)).images[0]
            match = fill_colour_match(image, colour)
            kept += match["match"]
            came_back_as[str(match["nearest"])] = came_back_as.get(str(match["nearest"]), 0) + 1
            styles.append(style_score_image(image))
        out[colour] = {"kept": kept, "of": num_seeds, "came_back_as": dict(sorted(came_back_as.items())),
                       "style_mean": float(np.mean(styles))}
    return out


def colour_sweep(run: Path, num_seeds: int, resolution: int) -> dict:
    """``sweep_colours`` for the base ("base") and the base + the run's export ("export"), both loaded with stock
    diffusers."""
    from diffusers import StableDiffusionPipeline

    config = run_config(run)
    pipe = StableDiffusionPipeline.from_pretrained(config.get("pretrained_model_name_or_path") or TINY_BASE_PATH)
    pipe.set_progress_bar_config(disable=True)
    guidance = config.get("sample_guidance_scale", 4.0)
    result = {"prompts": {c: colour_sweep_prompt(c) for c in COLOR_NAMES}, "seeds": num_seeds, "guidance": guidance,
              "base": sweep_colours(pipe, num_seeds, resolution, guidance)}
    pipe.load_lora_weights(str(run))
    result["export"] = sweep_colours(pipe, num_seeds, resolution, guidance)
    return result


def sweep_markdown(sweep: dict) -> str:
    lines = ["| colour word | base: colour kept | export: colour kept | export: came back as | export: style (mean) |",
             "|---|---|---|---|---|"]
    for colour in COLOR_NAMES:
        b, e = sweep["base"][colour], sweep["export"][colour]
        came = ", ".join(f"{name} {k}" for name, k in e["came_back_as"].items() if name != colour)
        lines.append(f"| {colour} | {b['kept']}/{b['of']} | {e['kept']}/{e['of']} | {came or '-'} | {e['style_mean']:.2f} |")
    total = lambda part: sum(v["kept"] for v in sweep[part].values())  # noqa: E731
    n = sweep["seeds"] * len(COLOR_NAMES)
    lines.append(f"| all | {total('base')}/{n} | {total('export')}/{n} | | |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    lines = ["| snapshot | style score (mean) | per sample | prompt colour matched |", "|---|---|---|---|"]
    for label, m in report["snapshots"].items():
        per = ", ".join(f"{s['style']:.2f}" for s in m["samples"])
        lines.append(f"| {label} | {m['style_mean']:.2f} | {per} | {m['colour_matches']}/{m['colour_checked']} |")
    for name in ("dataset", "base_style"):
        r = report[name]
        lines.append(f"| {name.replace('_', ' ')} ({r['n']} images) | {r['mean']:.2f} | min {r['min']:.2f}, "
                     f"max {r['max']:.2f} | |")
    return "\n".join(lines)


def latent_distances(base_path: str) -> dict:
    """``fill_latent_distances`` of the base's VAE for the dataset's pastel fills and the base's saturated ones."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base_path, subfolder="vae").float().eval()
    report = {}
    for style, (colours, background, outline) in PROBE_STYLES.items():
        result = fill_latent_distances(vae, colours, background, outline)
        report[style] = {f"{a}-{b}": d for (a, b), d in result["distances"].items()}
        report[f"{style}_decoded_as"] = result["decoded"]
    return report


def latent_markdown(distances: dict) -> str:
    lines = ["| fill pair | pastel (dataset): latent distance | saturated (base) |", "|---|---|---|"]
    for pair in sorted(distances["pastel"], key=distances["pastel"].get):
        lines.append(f"| {pair} | {distances['pastel'][pair]:.2f} | {distances['saturated'][pair]:.2f} |")
    for style in PROBE_STYLES:
        wrong = {name: got for name, got in distances[f"{style}_decoded_as"].items() if got != name}
        lines.append(f"\n{style} probes decoded by the VAE: "
                     + (", ".join(f"{name} comes back {got}" for name, got in sorted(wrong.items())) or "every colour kept"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the --output_dir of a training run")
    ap.add_argument("--num_reference", type=int, default=200, help="dataset / base-style images scored for reference")
    ap.add_argument("--json", type=Path, default=None, help="also write the full report here")
    ap.add_argument("--vae_round_trip", type=int, default=0, metavar="N",
                    help="also round-trip N dataset images through the base's VAE")
    ap.add_argument("--colour_sweep", type=int, default=0, metavar="N",
                    help="also sample every colour word at seeds 0..N-1 from the base and the export")
    ap.add_argument("--latent_distances", action="store_true",
                    help="also print how far apart the base's VAE puts each pair of fill colours in its latent space")
    args = ap.parse_args(argv)
    folders = snapshot_folders(args.run)
    first = next(folders[0][1].glob("prompt-*.png"))
    resolution = Image.open(first).size[0]
    report = {"run": str(args.run), "resolution": resolution,
              "snapshots": {label: measure_folder(folder) for label, folder in folders},
              "dataset": reference_scores(pokemon_style_sample, args.num_reference, resolution),
              "base_style": reference_scores(base_style_sample, args.num_reference, resolution)}
    print(markdown(report))
    base = run_config(args.run).get("pretrained_model_name_or_path") or TINY_BASE_PATH
    if args.vae_round_trip:
        report["vae_round_trip"] = base_vae_round_trip(base, args.vae_round_trip, resolution)
        print("VAE round trip of dataset images:", json.dumps(report["vae_round_trip"]))
    if args.latent_distances:
        report["latent_distances"] = latent_distances(base)
        print(latent_markdown(report["latent_distances"]))
    if args.colour_sweep:
        report["colour_sweep"] = colour_sweep(args.run, args.colour_sweep, resolution)
        print(sweep_markdown(report["colour_sweep"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
