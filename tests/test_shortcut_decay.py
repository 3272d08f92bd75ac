"""Shortcut annealing and merge-and-continue: the lambda schedule, and merges that respect lambda.

Every expected value is computed here from its definition: the schedule's cosine, and each merge's
coefficients from activations recorded by hooks and a naive least-squares solve, on the six-layer
stack of ``test_equations`` (``is``/``ms`` segments [4, 2], ``bs`` segments [3, 1, 2]).
"""

import json
import math

import pytest
import torch

from reslora_diffusers import (
    ResLoRAConfig,
    ShortcutSchedule,
    load_training_state,
    merge_reslora,
    merge_shortcuts_in_place,
    merged_view,
    reset_optimizer_state,
    save_training_state,
)
from reslora_diffusers.core.model import get_controller
from test_equations import ALPHA, NAMES, R, make_model

LAM = 0.37
HEADS = {"0", "8"}  # is/ms chain heads: the 6-wide segment starts at layer 0, the 9-wide one at layer 4 ("8")


def batches(n=3, seed=20):
    return [torch.randn(5, 6, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64) for i in range(n)]


def forward(model, x):
    return model(x)


def record_inputs(model, inputs, train=True):
    """Run ``inputs`` through the model and return {layer name: [input of each forward]}.

    In training mode (and without a ShortcutSchedule) every forward records the 'bi' norms.
    """
    seen = {name: [] for name in NAMES}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in NAMES]
    model.train(train)
    with torch.no_grad():
        for x in inputs:
            model(x)
    for h in hooks:
        h.remove()
    model.eval()
    return seen


def lora(model, name):
    layer = model.get_submodule(name)
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def lstsq(features, target):
    """M minimising ||target - features M^T|| (float64)."""
    return torch.linalg.lstsq(features, target).solution.T


def test_schedule_is_one_then_cosine_then_zero():
    cfg = ResLoRAConfig(structure="is", target_modules=["x"], shortcut_decay=(0.5, 0.9))
    assert [cfg.shortcut_scale(p) for p in (0.0, 0.3, 0.5)] == [1.0, 1.0, 1.0]
    assert cfg.shortcut_scale(0.7) == pytest.approx(0.5)  # the middle of the window
    assert cfg.shortcut_scale(0.6) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert [cfg.shortcut_scale(p) for p in (0.9, 0.95, 1.0)] == [0.0, 0.0, 0.0]
    assert ResLoRAConfig(structure="is", target_modules=["x"]).shortcut_scale(0.99) == 1.0


def test_config_refuses_bad_schedules():
    for bad in [(0.9, 0.5), (-0.1, 0.5), (0.2, 1.2), (0.3,), "a"]:
        with pytest.raises(ValueError, match="shortcut_decay"):
            ResLoRAConfig(structure="is", target_modules=["x"], shortcut_decay=bad)
    with pytest.raises(ValueError, match="merge_at"):
        ResLoRAConfig(structure="bs", target_modules=["x"], merge_at=0.5)
    with pytest.raises(ValueError, match="merge_at"):
        ResLoRAConfig(structure="is", target_modules=["x"], merge_at=1.0)
    with pytest.raises(ValueError, match="not both"):
        ResLoRAConfig(structure="ms", target_modules=["x"], merge_at=0.5, shortcut_decay=(0.2, 0.6))
    cfg = ResLoRAConfig(structure="ms", target_modules=["x"], shortcut_decay=[0.2, 0.6])
    assert ResLoRAConfig.from_dict(json.loads(cfg.to_json())) == cfg  # the tuple survives JSON


def test_set_progress_follows_the_config():
    ctl = get_controller(make_model("is", 1))
    ctl.config.shortcut_decay = (0.2, 0.6)
    assert ctl.set_progress(0.1) == 1.0 and ctl.set_progress(0.4) == pytest.approx(0.5)
    assert ctl.set_progress(0.6) == 0.0 and ctl.shortcut_scale == 0.0


@pytest.mark.parametrize("structure", ["is", "bs", "ms"])
@pytest.mark.parametrize("method", ["no", "bi", "bw", "ls"])
def test_lambda_zero_exports_the_plain_lora_exactly(structure, method):
    model = make_model(structure, -1)
    record_inputs(model, batches())  # traces the chains, fills the bi windows at lambda = 1
    get_controller(model).shortcut_scale = 0.0
    result = merge_reslora(model, method=method, calibration_batches=batches(seed=40), forward_fn=forward)
    assert result.report["method"] == "exact" and result.report["shortcut_scale"] == 0.0
    assert result.report["calibration"]["relative_output_error"] < 1e-6
    for name in NAMES:
        a, b = lora(model, name)
        a_star, b_star = result.factors[name]
        torch.testing.assert_close(a_star, a.float())
        torch.testing.assert_close(b_star, (ALPHA / R) * b.float())


@pytest.mark.parametrize("pre_num", [1, -1])
def test_bs_merge_is_exact_at_any_lambda(pre_num):
    model = make_model("bs", pre_num)
    get_controller(model).shortcut_scale = LAM
    result = merge_reslora(model, calibration_batches=batches(), forward_fn=forward)
    assert result.report["calibration"]["relative_output_error"] < 1e-6
    third, second = NAMES[2], NAMES[1]  # the third layer is linked to the second: B* = s [B_3, lam B_2, ...]
    torch.testing.assert_close(result.factors[third][1][:, R:2 * R], (ALPHA / R) * LAM * lora(model, second)[1].float())


def reloaded(model, structure, pre_num, tmp_path):
    """A copy of ``model`` (same base, LoRA zeroed) that gets everything else from the saved training state."""
    save_training_state(model, str(tmp_path))
    fresh = make_model(structure, pre_num)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_" in name:
                p.zero_()
    load_training_state(fresh, str(tmp_path))
    return fresh


def test_is_merges_scale_with_lambda():
    model = make_model("is", 1)
    get_controller(model).shortcut_scale = LAM
    train_inputs = record_inputs(model, batches())  # also fills the bi windows
    calib = batches(seed=40)
    calib_inputs = record_inputs(model, calib, train=False)
    s = ALPHA / R
    weights = {n: model.get_submodule(n).base_layer.weight.detach() for n in NAMES}
    frob = {n: torch.linalg.matrix_norm(weights[n] + s * lora(model, n)[1] @ lora(model, n)[0]) for n in NAMES}
    for method in ("bi", "bw", "ls"):
        factors = merge_reslora(model, method=method, calibration_batches=calib, forward_fn=forward).factors
        for i, name in enumerate(NAMES):
            a, _ = lora(model, name)
            if name in HEADS:
                expected = (1 + LAM) * a
            elif method == "bi":  # eq. 9: mean input norms of the previous and this layer
                ratio = (sum(x.norm() for x in train_inputs[NAMES[i - 1]]) / sum(x.norm() for x in train_inputs[name]))
                expected = (1 + LAM * ratio) * a
            elif method == "bw":  # eq. 11: f*_{n-2} / f*_{n-1}, 1 without a layer n-2 in the segment
                ratio = frob[NAMES[i - 2]] / frob[NAMES[i - 1]] if NAMES[i - 1] not in HEADS else 1.0
                expected = (1 + LAM * ratio) * a
            else:  # ls: A x_{n-1} ~ M A x_n, A* = A + lam M A
                feats = torch.cat([x @ a.T for x in calib_inputs[name]])
                target = torch.cat([x @ a.T for x in calib_inputs[NAMES[i - 1]]])
                expected = a + LAM * lstsq(feats, target) @ a
            torch.testing.assert_close(factors[name][0], expected.float(), rtol=1e-4, atol=1e-5, msg=f"{method} {name}")


@pytest.mark.parametrize("pre_num", [1, -1])
def test_ms_merges_scale_with_lambda(pre_num):
    model = make_model("ms", pre_num)
    get_controller(model).shortcut_scale = LAM
    train_inputs = record_inputs(model, batches())
    calib = batches(seed=40)
    calib_inputs = record_inputs(model, calib, train=False)
    segment = {n: NAMES[:4] if NAMES.index(n) < 4 else NAMES[4:] for n in NAMES}
    for method in ("bi", "ls"):
        factors = merge_reslora(model, method=method, calibration_batches=calib, forward_fn=forward).factors
        for name in NAMES:
            seg = segment[name]
            earlier = seg[: seg.index(name)][::-1][: None if pre_num == -1 else pre_num]  # nearest first
            a = lora(model, name)[0]
            if not earlier:
                expected = a
            elif method == "bi":  # eq. 12: f = mean norm of the A-outputs
                f = {n: sum((x @ lora(model, n)[0].T).norm() for x in train_inputs[n]) for n in [name, *earlier]}
                expected = (1 + LAM * sum(f[n] / f[name] for n in earlier)) * a
            else:  # sum_k A_{n-k} x_{n-k} ~ sum_{k>=0} M_k A_{n-k} x_n, A* = A_n + lam sum_k M_k A_{n-k}
                blocks = [a] + [lora(model, n)[0] for n in earlier]
                feats = torch.cat([torch.cat([x @ blk.T for blk in blocks], dim=1) for x in calib_inputs[name]])
                target = torch.cat([sum(calib_inputs[n][j] @ lora(model, n)[0].T for n in earlier)
                                    for j in range(len(calib))])
                m = lstsq(feats, target)
                expected = a + LAM * sum(m[:, k * R:(k + 1) * R] @ blk for k, blk in enumerate(blocks))
            torch.testing.assert_close(factors[name][0], expected.float(), rtol=1e-4, atol=1e-5, msg=f"{method} {name}")


@pytest.mark.parametrize("structure", ["is", "ms"])
def test_merge_in_place_then_plain_lora(structure, tmp_path):
    model = make_model(structure, -1)
    record_inputs(model, batches())
    calib = batches(seed=40)
    x = batches(1, seed=60)[0]
    expected = merge_reslora(model, method="ls", calibration_batches=calib, forward_fn=forward)
    with torch.no_grad(), merged_view(model, expected):
        merged_out = model(x)

    merge_shortcuts_in_place(model, method="ls", calibration_batches=calib, forward_fn=forward)
    ctl = get_controller(model)
    assert ctl.shortcuts_merged and ctl.set_progress(0.1) == 0.0  # stays plain LoRA
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged_out, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_shortcuts_in_place(model, method="ls", calibration_batches=calib, forward_fn=forward)

    fresh = reloaded(model, structure, -1, tmp_path)
    assert get_controller(fresh).shortcuts_merged and get_controller(fresh).shortcut_scale == 0.0
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_training_state_keeps_lambda(tmp_path):
    model = make_model("is", 1)
    get_controller(model).shortcut_scale = LAM
    x = batches(1)[0]
    with torch.no_grad():
        out = model(x)
    fresh = reloaded(model, "is", 1, tmp_path)
    assert get_controller(fresh).shortcut_scale == LAM
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out)


def test_schedule_object_sets_lambda_and_merges_once_with_fresh_moments():
    model = make_model("is", 1)
    ctl = get_controller(model)
    ctl.config.merge_at = 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    calib = batches(seed=40)
    sched = ShortcutSchedule(model, 10, opt, "ls", calib, forward)
    assert sched.update(0) == 1.0 and sched.merge_step == 5
    for step in range(1, 5):
        model(batches(1, seed=step)[0]).pow(2).mean().backward()
        opt.step()
        assert sched.update(step) == 1.0 and not ctl.shortcuts_merged
    a_params = {id(v.lora_weights()[0]) for v in ctl.variants.values()}
    assert sched.update(5) == 0.0 and ctl.shortcuts_merged and sched.merge_report["method"] == "ls"
    assert [p for p in opt.state if id(p) in a_params] == []  # A's moments dropped, B's kept
    assert len(opt.state) == len(params) - len(a_params)
    a_after = [v.lora_weights()[0].clone() for v in ctl.variants.values()]
    assert sched.update(6) == 0.0  # no second merge: A unchanged
    assert all(torch.equal(a, v.lora_weights()[0]) for a, v in zip(a_after, ctl.variants.values()))


def test_reset_refuses_an_optimizer_that_keys_state_elsewhere():
    param = torch.nn.Parameter(torch.ones(3))
    elsewhere = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([elsewhere])
    elsewhere.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        reset_optimizer_state(opt, [param])
    wrapper = type("Wrapped", (), {"optimizer": opt})()  # accelerate's wrapper keeps the torch optimizer here
    assert reset_optimizer_state(wrapper, [elsewhere]) == 1 and not opt.state


@pytest.mark.parametrize("every", [1, 3])
def test_schedule_records_norms_in_every_kth_step_only(every):
    """Two forwards per step (gradient accumulation): both are recorded in steps 0, k, 2k, ..., none in between."""
    model = make_model("is", 1)
    ctl = get_controller(model)
    ctl.config.norm_every = every
    schedule = ShortcutSchedule(model, 7)
    recorded = []
    for step in range(7):
        schedule.update(step)
        inputs = record_inputs(model, batches(2, seed=10 * step))
        if step % every == 0:
            recorded += inputs[NAMES[1]]
    record_inputs(model, batches(2, seed=99), train=False)  # evaluation forwards record nothing
    v = ctl.variants[NAMES[1]]
    assert v.norm_count == len(recorded)
    torch.testing.assert_close(v.norm_window[: len(recorded)], torch.stack([x.norm() for x in recorded]).float())
