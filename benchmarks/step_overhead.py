"""Training-step overhead of ResLoRA (is / bs / ms) against plain PEFT LoRA, arms interleaved.

One model instance serves every arm: peft LoRA layers are injected once (nonzero A and B), and each
arm is attached and detached around its steps:

- ``PEFT LoRA``: the model as is (stock peft LoRA forward);
- ``ResLoRA <s> m=<k>`` (ours): ``inject_reslora`` reusing those LoRA layers, ``remove_reslora`` after;
  the chains are traced once and restored with ``restore_chains`` on later attaches;
- ``naive <s> m=<k>``: forward hooks on the stock peft layers with one extra LoRA call per previous
  block (``benchmarks/naive_reslora.py``), checked once against ours (output and LoRA gradients).

A step is: zero_grad, forward, MSE loss against a fixed random target, backward, AdamW step on the
LoRA parameters. Same model, batch and seed for every arm. After warm-up rounds, each timed round
visits every arm once (the order rotates by one arm per round so that no arm always follows the
same one); a visit attaches the arm, runs ``--warmup_per_visit`` untimed steps and
``--steps_per_visit`` timed steps, then detaches. Reported per arm: the median step time, its ratio
to PEFT LoRA's median, and the median (and IQR) of the per-round paired ratios arm / PEFT LoRA,
which is what cancels the load drift of a shared machine.

Memory: on CPU there is no reliable peak allocator counter, so the step's activation memory is
measured as the bytes of the distinct storages that autograd saves for backward during the forward
(``torch.autograd.graph.saved_tensors_hooks``) plus those held by the arm's shortcut cache (ResLoRA's
controller cache, the naive hooks' cache), excluding parameter storages (frozen and LoRA weights are
held either way). This is the memory a training step holds at its forward/backward
boundary beyond the weights. On CUDA, additionally ``torch.cuda.max_memory_allocated`` during one
step minus the allocation before it. Both are measured in separate, untimed steps.

    python -m benchmarks.step_overhead --model tiny
    nohup python -m benchmarks.step_overhead --model sd2 > sd2.log 2>&1 &
    python -m benchmarks.step_overhead --model tiny --quick     # smoke test, does not write docs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.naive_reslora import NaiveResLoRA

from reslora_diffusers import ResLoRAConfig, ShortcutSchedule, inject_reslora, remove_reslora
from reslora_diffusers.core.model import get_controller

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

SD2_UNET_CONFIG = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

# defaults per model: (batch, latent size, rank, alpha, cross dim, warmup rounds, rounds, steps/visit, warmup/visit)
MODEL_DEFAULTS = {
    "tiny": dict(batch=4, size=32, rank=4, alpha=8, warmup=2, rounds=25, steps_per_visit=1, warmup_per_visit=0,
                 naive=True),
    "sd2": dict(batch=1, size=32, rank=16, alpha=32, warmup=1, rounds=6, steps_per_visit=1, warmup_per_visit=0,
                naive=False),
}
QUICK = dict(warmup=1, rounds=3, steps_per_visit=1, warmup_per_visit=0)


# ----------------------------------------------------------------------------------------- models
def build_model(name: str, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if name == "tiny":
        from reslora_diffusers.demo.tiny_sd2 import TINY_CROSS_ATTENTION_DIM, build_tiny_unet

        return build_tiny_unet(seed=seed), TINY_CROSS_ATTENTION_DIM
    if name == "sd2":
        return UNet2DConditionModel(**SD2_UNET_CONFIG), SD2_UNET_CONFIG["cross_attention_dim"]
    raise ValueError(name)


def add_lora(model, rank: int, alpha: float, seed: int):
    """peft LoRA on the attention projections, with nonzero A and B at a moderate scale."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False), model
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return lora


def make_batch(batch: int, size: int, cross_dim: int, seed: int, device):
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(batch, 4, size, size, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 77, cross_dim, generator=g)
    target = torch.randn(batch, 4, size, size, generator=g)
    return tuple(t.to(device) for t in (latents, timesteps, text, target))


# ------------------------------------------------------------------------------------------- arms
@dataclass
class Arm:
    name: str
    family: str  # "peft", "ours", "naive"
    structure: str = "none"
    pre_num: int = 1
    lam: float = 1.0  # shortcut weight lambda (shortcut_decay mid-window when < 1)
    attach: Callable[[], None] = lambda: None
    detach: Callable[[], None] = lambda: None
    times: list = field(default_factory=list)  # per round: list of step seconds
    saved_bytes: Optional[int] = None
    cuda_peak: Optional[int] = None


def ours_arm(model, structure: str, pre_num: int, rank: int, alpha: float, lam: float = 1.0) -> Arm:
    """Our ResLoRA, stepped as the training script steps it: a ShortcutSchedule update before each step
    (so the 'bi' norms are recorded every ``norm_every``-th step), lambda held at ``lam``."""
    cfg = ResLoRAConfig(structure=structure, pre_num=pre_num, r=rank, lora_alpha=alpha, target_modules=TARGETS)
    state = {"summary": None, "step": 0, "hook": None}

    def before_step(module, args):
        state["schedule"].update(state["step"])
        get_controller(model).shortcut_scale = lam
        state["step"] += 1

    def attach():
        inject_reslora(model, cfg)
        state["schedule"] = ShortcutSchedule(model, max_steps=10 ** 9)
        state["hook"] = model.register_forward_pre_hook(before_step)
        if state["summary"] is not None:
            get_controller(model).restore_chains(state["summary"])

    def detach():
        ctl = get_controller(model)
        if state["summary"] is None and ctl.traced:
            state["summary"] = ctl.chain_summary()
        state["hook"].remove()
        remove_reslora(model)

    name = f"ResLoRA {structure} m={pre_num}" + (f" lambda={lam:g}" if lam != 1.0 else "")
    return Arm(name, "ours", structure, pre_num, lam, attach, detach)


def naive_arm(model, structure: str, pre_num: int) -> Arm:
    naive = NaiveResLoRA(model, structure, pre_num, TARGETS)
    arm = Arm(f"naive {structure} m={pre_num}", "naive", structure, pre_num, attach=naive.attach, detach=naive.detach)
    arm.naive = naive
    return arm


# ------------------------------------------------------------------------------------------ steps
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, batch):
    latents, timesteps, text, target = batch
    opt.zero_grad(set_to_none=True)
    out = model(latents, timesteps, text).sample
    loss = F.mse_loss(out, target)
    loss.backward()
    opt.step()
    return loss


@contextlib.contextmanager
def count_saved(param_ptrs: set):
    """Total bytes of the distinct non-parameter storages autograd saves during the block."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    result = {"bytes": 0, "add": pack}  # "add": count further live tensors (the shortcut caches)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


def measure_memory(arm: Arm, model, opt, batch, device, param_ptrs):
    arm.attach()
    try:
        gc.collect()
        latents, timesteps, text, target = batch
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        opt.zero_grad(set_to_none=True)
        with count_saved(param_ptrs) as saved:
            out = model(latents, timesteps, text).sample
            loss = F.mse_loss(out, target)
            # activations the shortcut caches keep alive until the next forward (they may not be saved)
            cache = (get_controller(model).cache if arm.family == "ours"
                     else arm.naive.cache if arm.family == "naive" else {})
            for t in cache.values():
                saved["add"](t)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            sync(device)
            arm.cuda_peak = torch.cuda.max_memory_allocated(device) - before
        arm.saved_bytes = saved["bytes"]
        del out, loss
    finally:
        arm.detach()


def visit(arm: Arm, model, opt, batch, device, warmup: int, timed: int) -> list:
    gc.collect()
    arm.attach()
    times = []
    try:
        for _ in range(warmup):
            train_step(model, opt, batch)
        sync(device)
        gc.disable()
        try:
            for _ in range(timed):
                t0 = time.perf_counter()
                train_step(model, opt, batch)
                sync(device)
                times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    finally:
        arm.detach()
    return times


# ------------------------------------------------------------------------------- equivalence check
def check_naive_equivalence(model, arms_by_key, batch, lora_params) -> list:
    """Ours vs naive: same output and same LoRA gradients (train mode, one step without the update)."""
    latents, timesteps, text, target = batch
    rows = []

    def run(arm):
        arm.attach()
        try:
            for p in lora_params:
                p.grad = None
            out = model(latents, timesteps, text).sample
            F.mse_loss(out, target).backward()
            grads = [p.grad.detach().clone() for p in lora_params]
            return out.detach().clone(), grads
        finally:
            arm.detach()

    peft_out, _ = run(arms_by_key[("peft", "none", 1)])
    for (family, structure, pre_num), arm in arms_by_key.items():
        if family != "ours" or ("naive", structure, pre_num) not in arms_by_key:
            continue
        naive = arms_by_key[("naive", structure, pre_num)]
        o_out, o_grads = run(arm)
        n_out, n_grads = run(naive)
        out_diff = (o_out - n_out).abs().max().item()
        grad_diff = max((a - b).abs().max().item() for a, b in zip(o_grads, n_grads))
        grad_scale = max(a.abs().max().item() for a in o_grads)
        shortcut = (o_out - peft_out).abs().max().item()
        ours_links = sum(len(v.preds) for v in _traced_ours(model, arm))
        rows.append(dict(structure=structure, pre_num=pre_num, out_diff=out_diff, grad_diff=grad_diff,
                         grad_scale=grad_scale, shortcut_effect=shortcut, ours_links=ours_links,
                         naive_links=naive.naive.links()))
    for p in lora_params:
        p.grad = None
    return rows


def _traced_ours(model, arm):
    arm.attach()
    try:
        return list(get_controller(model).variants.values())
    finally:
        arm.detach()


# ------------------------------------------------------------------------------------------ stats
def quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(arms: list, ref: Arm) -> list:
    ref_med = statistics.median(t for r in ref.times for t in r)
    rows = []
    for arm in arms:
        flat = [t for r in arm.times for t in r]
        med = statistics.median(flat)
        paired = [statistics.median(a) / statistics.median(b) for a, b in zip(arm.times, ref.times)]
        rows.append(dict(
            arm=arm, median_ms=med * 1e3, ratio=med / ref_med, paired=statistics.median(paired),
            paired_q1=quantile(paired, 0.25), paired_q3=quantile(paired, 0.75), n=len(flat),
            mem_ratio=(arm.saved_bytes / ref.saved_bytes) if arm.saved_bytes and ref.saved_bytes else None,
            cuda_ratio=(arm.cuda_peak / ref.cuda_peak) if arm.cuda_peak and ref.cuda_peak else None,
        ))
    return rows


def paired_between(a: Arm, b: Arm):
    paired = [statistics.median(x) / statistics.median(y) for x, y in zip(a.times, b.times)]
    return statistics.median(paired), quantile(paired, 0.25), quantile(paired, 0.75)


def table(rows, device) -> str:
    cuda = device.type == "cuda"
    head = ("| arm | median step ms | ratio vs PEFT LoRA | paired ratio, median [IQR] | "
            "saved-activation memory ratio |" + (" CUDA peak ratio |" if cuda else ""))
    sep = "|---|---:|---:|---:|---:|" + ("---:|" if cuda else "")
    lines = [head, sep]
    for r in rows:
        mem = f"{r['mem_ratio']:.3f}" if r["mem_ratio"] is not None else "n/a"
        line = (f"| {r['arm'].name} | {r['median_ms']:.1f} | {r['ratio']:.3f}x | "
                f"{r['paired']:.3f}x [{r['paired_q1']:.3f}, {r['paired_q3']:.3f}] | {mem} |")
        if cuda:
            line += f" {r['cuda_ratio']:.3f} |" if r["cuda_ratio"] is not None else " n/a |"
        lines.append(line)
    return "\n".join(lines)


def machine_info(device) -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    import diffusers
    import peft

    info = [
        f"started {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"CPU {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}, git HEAD {commit} (plus uncommitted work)",
    ]
    return "; ".join(info)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------ docs
def write_doc(path: Path, model_name: str, section: str):
    begin, end = f"<!-- BEGIN {model_name} -->", f"<!-- END {model_name} -->"
    text = path.read_text() if path.exists() else DOC_HEADER
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


DOC_HEADER = """# Training-step overhead of ResLoRA vs PEFT LoRA

Written by `benchmarks/step_overhead.py` (see its docstring for the method). In short: one model,
peft LoRA injected once with nonzero A and B on `to_q, to_k, to_v, to_out.0`; each arm (plain PEFT
LoRA, ResLoRA `is`/`bs`/`ms` attached with `inject_reslora` and detached with `remove_reslora`, and
on the tiny model a naive hook-based ResLoRA) runs full training steps (forward, MSE loss, backward,
AdamW on the LoRA parameters) on the same batch, interleaved round-robin with a rotating order.
"Ratio vs PEFT LoRA" is the ratio of medians; "paired ratio" is the median (and interquartile
range) of per-round ratios arm / PEFT LoRA measured side by side, the number to trust on a shared
machine. `is` always uses exactly one predecessor, so it is measured once (pre_num has no effect).

Memory on CPU: bytes of the distinct non-parameter storages that autograd saves for backward in one
step plus those the arm's shortcut cache holds (activation memory alive at the forward/backward
boundary), ratio to PEFT LoRA. On CUDA the table
also gives the ratio of `torch.cuda.max_memory_allocated` growth during a step.
"""


# ------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "sd2"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a few rounds only (smoke test); docs not written "
                    "unless --out is given")
    ap.add_argument("--rounds", type=int, help="timed rounds (each visits every arm once)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up rounds (>= 1; the first one measures memory)")
    ap.add_argument("--steps_per_visit", type=int)
    ap.add_argument("--warmup_per_visit", type=int)
    ap.add_argument("--pre_nums", type=int, nargs="+", default=[1, 4], help="the pre_num values of bs and ms")
    ap.add_argument("--lambdas", type=float, nargs="*", default=[],
                    help="also time every structure with this shortcut weight (the shortcut_decay window), e.g. 0.5")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", type=int, help="latent height = width")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--lora_alpha", dest="alpha", type=float)
    ap.add_argument("--naive", dest="naive", action="store_true", default=None, help="include the naive arms")
    ap.add_argument("--no_naive", dest="naive", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: on a shared, loaded 2-core machine two threads "
                    "spin-wait against other jobs and run 3-40x slower and erratically)")
    ap.add_argument("--out", help="markdown file to update (default docs/step_overhead.md; not with --quick)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile STEPS steps of every arm with torch.profiler and print the top ops")
    args = ap.parse_args(argv)

    d = dict(MODEL_DEFAULTS[args.model])
    if args.quick:
        d.update(QUICK)
    for key in ("rounds", "warmup", "steps_per_visit", "warmup_per_visit", "batch", "size", "rank", "alpha",
                "naive"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    print(command, flush=True)
    info = machine_info(device)  # taken at the start
    print(info, flush=True)
    load_start = loadavg()
    print(f"load average at start: {load_start}", flush=True)

    t_build = time.perf_counter()
    model, cross_dim = build_model(args.model, args.seed)
    lora = add_lora(model, d["rank"], d["alpha"], args.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in lora)
    print(f"built {args.model} UNet: {n_params / 1e6:.1f}M parameters, {n_lora / 1e6:.3f}M LoRA "
          f"({len(lora) // 2} adapted Linears) in {time.perf_counter() - t_build:.1f} s", flush=True)
    batch = make_batch(d["batch"], d["size"], cross_dim, args.seed, device)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    arms = [Arm("PEFT LoRA", "peft")]
    structures = [("is", 1)] + [(s, m) for s in ("bs", "ms") for m in args.pre_nums]
    for s, m in structures:
        arms.append(ours_arm(model, s, m, d["rank"], d["alpha"]))
    for lam in args.lambdas:  # shortcut_decay's window, where every shortcut term is scaled
        arms += [ours_arm(model, s, m, d["rank"], d["alpha"], lam) for s, m in structures]
    if d["naive"]:
        for s, m in structures:
            arms.append(naive_arm(model, s, m))
    by_key = {(a.family, a.structure, a.pre_num): a for a in arms if a.lam == 1.0}
    ref = arms[0]

    equivalence = []
    if d["naive"]:
        equivalence = check_naive_equivalence(model, by_key, batch, lora)
        print("ours vs naive (train mode, same weights and batch):", flush=True)
        for e in equivalence:
            ok = e["out_diff"] <= 1e-5 and e["grad_diff"] <= 1e-5 * max(1.0, e["grad_scale"])
            e["ok"] = ok
            print(f"  {e['structure']} m={e['pre_num']}: max|out diff| {e['out_diff']:.2e}, "
                  f"max|LoRA grad diff| {e['grad_diff']:.2e} (grad scale {e['grad_scale']:.2e}), "
                  f"shortcut effect vs PEFT {e['shortcut_effect']:.2e}, links ours {e['ours_links']} / "
                  f"naive {e['naive_links']} -> {'OK' if ok else 'MISMATCH'}", flush=True)
        if not all(e["ok"] and e["ours_links"] == e["naive_links"] for e in equivalence):
            raise SystemExit("ours and the naive baseline disagree: the comparison would not be fair")

    # warm-up rounds (also trace every arm's chains)
    t0 = time.perf_counter()
    d["warmup"] = max(1, d["warmup"])
    d["warmup"] = max(1, d["warmup"])
    for w in range(d["warmup"]):
        for arm in arms:
            if w == 0:  # the first warm-up round measures memory (the counting hooks would perturb timing)
                measure_memory(arm, model, opt, batch, device, param_ptrs)
            else:
                visit(arm, model, opt, batch, device, 0, max(1, d["steps_per_visit"]))
        print(f"warm-up round {w + 1}/{d['warmup']} done, {time.perf_counter() - t0:.0f} s", flush=True)
    for arm in arms:
        arm.times = []

    t0 = time.perf_counter()
    for r in range(d["rounds"]):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:
            arm.times.append(visit(arm, model, opt, batch, device, d["warmup_per_visit"], d["steps_per_visit"]))
        el = time.perf_counter() - t0
        eta = el / (r + 1) * (d["rounds"] - r - 1)
        last = " ".join(f"{statistics.median(a.times[-1]) * 1e3:.0f}" for a in arms)
        print(f"round {r + 1}/{d['rounds']}: {el:.0f} s elapsed, ~{eta:.0f} s left; step ms {last}", flush=True)
    timed_s = time.perf_counter() - t0

    load_end = loadavg()

    rows = summarize(arms, ref)
    md = table(rows, device)
    print()
    print(md)
    extra = []
    if d["naive"]:
        extra.append("\nOurs vs naive, per structure (paired per-round ratio ours / naive, median [IQR]):\n")
        extra.append("| structure | ours vs PEFT | naive vs PEFT | ours / naive |")
        extra.append("|---|---:|---:|---:|")
        row_of = {id(r["arm"]): r for r in rows}
        for s, m in structures:
            o, n = by_key[("ours", s, m)], by_key[("naive", s, m)]
            med, q1, q3 = paired_between(o, n)
            extra.append(f"| {s} m={m} | {row_of[id(o)]['paired']:.3f}x | {row_of[id(n)]['paired']:.3f}x | "
                         f"{med:.3f} [{q1:.3f}, {q3:.3f}] |")
        print("\n".join(extra))

    if args.profile:
        profile_arms(arms, model, opt, batch, device, args.profile)

    setup = (f"{args.model} UNet ({n_params / 1e6:.1f}M parameters, {len(lora) // 2} adapted Linears), latents "
             f"{d['batch']}x4x{d['size']}x{d['size']}, encoder_hidden_states {d['batch']}x77x{cross_dim}, rank "
             f"{d['rank']} alpha {d['alpha']:g}, fp32, {d['warmup']} warm-up rounds, {d['rounds']} timed rounds x "
             f"{d['steps_per_visit']} timed steps per visit ({d['warmup_per_visit']} untimed step(s) after each "
             f"attach), timed part {timed_s / 60:.1f} min")
    print("\n" + setup)
    out = args.out or (None if args.quick else str(ROOT / "docs" / "step_overhead.md"))
    if out:
        lines = [f"## `--model {args.model}`", "", "Command:", "", "```", command, "```", "",
                 f"Machine: {info}; load average (1, 5, 15 min) {load_start} at start, "
                 f"{load_end} at end (other jobs share the cores).", "", f"Setup: {setup}.", "", md]
        if equivalence:
            lines += ["", "Fairness check before timing (train mode, same weights and batch): ours vs naive "
                      "max |output diff| / max |LoRA grad diff|, and ours' max |output - PEFT LoRA output| "
                      "(the shortcuts do change the output):", ""]
            for e in equivalence:
                lines.append(f"- {e['structure']} m={e['pre_num']}: {e['out_diff']:.1e} / {e['grad_diff']:.1e}; "
                             f"shortcut effect {e['shortcut_effect']:.1e}; shortcut links {e['ours_links']} "
                             f"(naive {e['naive_links']})")
        lines += extra
        write_doc(Path(out), args.model, "\n".join(lines) + "\n")
        print(f"wrote {out}")


def profile_arms(arms, model, opt, batch, device, steps):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for arm in arms:
        arm.attach()
        try:
            train_step(model, opt, batch)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    train_step(model, opt, batch)
                sync(device)
        finally:
            arm.detach()
        print(f"\n### profile: {arm.name} ({steps} steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
