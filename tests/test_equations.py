"""ResLoRA forward and gradients against the paper's equations 2-4, written out naively here.

With shortcut annealing every shortcut term is multiplied by lambda: ``x_{n-1}`` in eq. 2 (and at a
chain head, where x_{n-1} := x_n), the k >= 1 terms of eqs. 3 and 4.

The model is a stack of Linears (with tanh between) whose shapes cut the chain into segments:
weight shapes (6,6) x3, (9,6), (9,9) x2 give bs segments [3, 1, 2]; input widths 6,6,6,6,9,9 give
is/ms segments [4, 2]. A and B are random (LoRA's B = 0 init would hide the shortcuts).
"""

import pytest
import torch
from torch import nn

from reslora_diffusers import ResLoRAConfig, inject_reslora
from reslora_diffusers.core.model import get_controller

DIMS = [(6, 6), (6, 6), (6, 6), (6, 9), (9, 9), (9, 9)]  # (in, out)
NAMES = [str(2 * i) for i in range(len(DIMS))]
R, ALPHA = 2, 3.0


def make_model(structure, pre_num, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (fin, fout) in enumerate(DIMS):
        layers.append(nn.Linear(fin, fout))
        if i < len(DIMS) - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers)
    cfg = ResLoRAConfig(structure=structure, pre_num=pre_num, r=R, lora_alpha=ALPHA, target_modules=NAMES)
    inject_reslora(model, cfg)
    model.double()  # compare in float64 so that 1e-5 measures the equations, not rounding order
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in NAMES:
            layer = model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(0.5 * torch.randn(layer.lora_A["default"].weight.shape, generator=gen))
            layer.lora_B["default"].weight.copy_(0.5 * torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
    return model


def naive_forward(params, x, structure, pre_num, lam=1.0):
    """params: list of dicts with W, b, A, B (leaf tensors); lam weights every shortcut term."""
    s = ALPHA / R
    inputs = []  # x_n of every layer
    a_out = []  # A_n x_n of every layer
    for n, p in enumerate(params):
        inputs.append(x)
        h = x @ p["W"].T + p["b"]
        if structure == "none":
            h = h + s * (x @ p["A"].T) @ p["B"].T
        elif structure == "is":
            linked = n > 0 and inputs[n - 1].shape == x.shape
            x_prev = inputs[n - 1] if linked else x  # eq. 2, x_{n-1} := x_n at a chain head
            h = h + s * ((x + lam * x_prev) @ p["A"].T) @ p["B"].T
        elif structure == "bs":
            # predecessors k = 1..m while the weight shapes stay equal, m = pre_num (-1: all)
            delta = p["B"] @ p["A"]
            k = 1
            while n - k >= 0 and (pre_num == -1 or k <= pre_num):
                if any(params[j]["W"].shape != p["W"].shape for j in range(n - k, n)):
                    break
                delta = delta + lam * params[n - k]["B"] @ params[n - k]["A"]
                k += 1
            h = h + s * x @ delta.T  # eq. 3
        elif structure == "ms":
            mid = x @ p["A"].T
            k = 1
            while n - k >= 0 and (pre_num == -1 or k <= pre_num):
                if any(inputs[j].shape != x.shape for j in range(n - k, n)):
                    break
                mid = mid + lam * inputs[n - k] @ params[n - k]["A"].T  # eq. 4
                k += 1
            h = h + s * mid @ p["B"].T
        a_out.append(x @ p["A"].T)
        x = torch.tanh(h) if n < len(params) - 1 else h
    return x


def leaf_params(model):
    params = []
    for name in NAMES:
        layer = model.get_submodule(name)
        params.append(
            {
                "W": layer.base_layer.weight.detach().clone(),
                "b": layer.base_layer.bias.detach().clone(),
                "A": layer.lora_A["default"].weight.detach().clone().requires_grad_(True),
                "B": layer.lora_B["default"].weight.detach().clone().requires_grad_(True),
            }
        )
    return params


@pytest.mark.parametrize("structure", ["none", "is", "bs", "ms"])
@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("lam", [1.0, 0.37, 0.0])
def test_forward_and_gradients_match_paper_equations(structure, pre_num, lam):
    model = make_model(structure, pre_num)
    get_controller(model).shortcut_scale = lam
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    probe = torch.randn(5, 9, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    out = model(x)
    (out * probe).sum().backward()

    params = leaf_params(model)
    ref = naive_forward(params, x, structure, pre_num, lam)
    (ref * probe).sum().backward()

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, p in zip(NAMES, params):
        layer = model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A["default"].weight.grad, p["A"].grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, p["B"].grad, atol=1e-5, rtol=1e-5)
        assert layer.base_layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("structure", ["is", "bs", "ms"])
def test_shortcuts_change_the_output(structure):
    """Guards the equation test against passing vacuously: ResLoRA must differ from plain LoRA here."""
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    plain = make_model("none", 1)(x)
    res = make_model(structure, 1)(x)
    assert (plain - res).abs().max() > 1e-2


def test_segments_follow_shape_rules():
    expected = {"bs": [3, 1, 2], "is": [4, 2], "ms": [4, 2], "none": [1] * 6}
    for structure, segments in expected.items():
        model = make_model(structure, -1)
        model(torch.randn(2, 6, dtype=torch.float64))
        assert get_controller(model).chain_summary()[""]["segments"] == segments, structure
