"""One battery of checks on tiny models x structures (UNet, LLaMA, RoBERTa, nn.Sequential)."""

import functools

import pytest
import torch
import torch.utils.checkpoint
from peft import LoraConfig, inject_adapter_in_model

from reslora_diffusers import (
    ResLoRAConfig,
    inject_reslora,
    load_training_state,
    merge_reslora,
    merged_view,
    save_training_state,
)
from reslora_diffusers.core.model import get_controller
from tiny_models import CASES, randomize_lora, unet_batch

STRUCTURES = ["none", "is", "bs", "ms"]


def make(case, structure, pre_num=2, scale=0.3, **kw):
    model = case.build()
    cfg = ResLoRAConfig(
        structure=structure, pre_num=pre_num, r=2, lora_alpha=4, target_modules=case.targets,
        modules_to_save=case.modules_to_save, **kw,
    )
    inject_reslora(model, cfg)
    randomize_lora(model, scale=scale)
    return model


def train_forwards(case, model, n=3):
    """A few forwards in training mode: traces the chains and fills the 'bi' windows."""
    model.train()
    with torch.no_grad():
        for seed in range(n):
            case.output(model, case.batch(100 + seed))
    model.eval()


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_keys_equal_plain_peft_lora(case_name, structure):
    case = CASES[case_name]
    res = make(case, structure)
    case.output(res, case.batch(0))  # chains exist now; they must not add keys
    plain = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=case.targets, modules_to_save=case.modules_to_save), case.build()
    )
    assert set(res.state_dict()) == set(plain.state_dict())
    trainable = {n for n, p in res.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_training_state_round_trip(case_name, structure, tmp_path):
    case = CASES[case_name]
    model = make(case, structure)
    train_forwards(case, model)
    batch = case.batch(1)
    with torch.no_grad():
        expected = case.output(model, batch)
    save_training_state(model, str(tmp_path))
    assert not (tmp_path / "adapter_config.json").exists()  # never mistaken for a plain LoRA

    fresh = case.build()
    load_training_state(fresh, str(tmp_path))
    ctl, ref = get_controller(fresh), get_controller(model)
    assert ctl.traced  # chains restored without a forward
    assert ctl.chain_summary() == ref.chain_summary()
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh, batch), expected, atol=1e-6, rtol=1e-6)
    for name, v in ref.variants.items():
        assert ctl.variants[name].norm_count == v.norm_count
        if v.norm_window is not None:
            torch.testing.assert_close(ctl.variants[name].norm_window, v.norm_window)


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_merged_view_equals_plain_lora_of_the_factors(case_name, structure):
    """The merged view is B* A* added to each base layer, written out here with plain peft LoRA."""
    case = CASES[case_name]
    model = make(case, structure)
    train_forwards(case, model)
    result = merge_reslora(model, method="bi")
    batch = case.batch(2)
    with torch.no_grad(), merged_view(model, result):
        merged = case.output(model, batch)

    plain = case.build()
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=case.targets), plain)
    hooks = []
    for name, (a, b) in result.factors.items():
        layer = plain.get_submodule(name)
        hooks.append(layer.register_forward_hook(lambda m, inp, out, a=a, b=b: m.base_layer(inp[0]) + inp[0] @ a.T @ b.T))
    if case.modules_to_save:  # the head is trained too: copy it
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "classifier" in k}, strict=False)
        for n, m in model.named_modules():
            if n.endswith("modules_to_save.default"):
                plain.get_submodule(n.replace(".modules_to_save.default", "")).load_state_dict(m.state_dict())
    with torch.no_grad():
        expected = case.output(plain, batch)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("pre_num", [1, 2, -1])
def test_bs_merge_is_exact(case_name, pre_num):
    case = CASES[case_name]
    model = make(case, "bs", pre_num=pre_num)
    batches = [case.batch(s) for s in range(2)]
    result = merge_reslora(model, calibration_batches=batches, forward_fn=case.output)
    assert result.report["calibration"]["relative_adapter_error"] < 1e-5
    ranks = set(result.ranks().values())
    assert max(ranks) > 2  # rank grows to (m+1) r on linked layers


@pytest.mark.parametrize("case_name", ["unet", "llama", "sequential"])
@pytest.mark.parametrize("structure", ["is", "ms"])
@pytest.mark.parametrize("pre_num", [1, -1])
def test_ls_merge_error_not_above_bi_and_bw(case_name, structure, pre_num):
    """Model-level error on a fixed calibration set.

    ``ls`` minimises each layer's error; that carries over to the model output while the adapter is a
    perturbation of the base weights (A, B ~ 0.1 N(0, 1) here). With adapters that dominate the base
    (0.3 N(0, 1) on these 16-wide models) errors compound and no merge is reliably best.
    """
    case = CASES[case_name]
    model = make(case, structure, pre_num=pre_num, scale=0.1)
    train_forwards(case, model, n=4)
    calib = [case.batch(200 + s) for s in range(3)]
    errors = {}
    for method in ("no", "bi", "bw", "ls"):
        report = merge_reslora(model, method=method, calibration_batches=calib, forward_fn=case.output).report
        errors[method] = report["calibration"]["relative_adapter_error"]
    assert errors["ls"] <= errors["bi"] + 1e-9, errors
    assert errors["ls"] <= errors["bw"] + 1e-9, errors
    assert errors["ls"] < errors["no"], errors


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _enable_unet_checkpointing(model):
    model.enable_gradient_checkpointing()  # diffusers' default is non-reentrant


def _enable_llama_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


CHECKPOINTING = {  # how to enable it, and how many LoRA parameters get gradients
    "unet": (_enable_unet_checkpointing, 2 * 128),
    "llama": (_enable_llama_checkpointing, 2 * 2 * 4),
}


@pytest.mark.parametrize("case_name", list(CHECKPOINTING))
@pytest.mark.parametrize("structure", STRUCTURES)
def test_non_reentrant_checkpointing_gives_the_same_gradients(case_name, structure):
    case = CASES[case_name]
    enable, num_lora_params = CHECKPOINTING[case_name]
    batch = case.batch(3)
    grads = []
    for checkpointing in (False, True):
        model = make(case, structure, pre_num=2)
        model.train()
        if checkpointing:
            enable(model)
        case.output(model, batch).square().mean().backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == num_lora_params
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("structure", ["is", "ms"])
def test_reentrant_checkpointing_is_refused_for_is_and_ms(structure):
    case = CASES["unet"]
    model = make(case, structure)
    model.train()
    model.enable_gradient_checkpointing(
        functools.partial(lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True))
    )
    batch = [t.requires_grad_(t.is_floating_point()) for t in case.batch(0)]
    with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"):
        case.output(model, batch).sum().backward()


def test_unet_chains_follow_execution_order_and_skip_the_mid_block_mismatch():
    """Registration order is down, up, mid; execution order is down, mid, up."""
    case = CASES["unet"]
    blocks = (
        [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
        + ["mid_block.attentions.0"]
        + [f"up_blocks.{b}.attentions.{i}" for b in range(1, 4) for i in range(3)]
    )
    for structure, seg_self, seg_text_kv in [
        ("is", [2, 2, 2, 1, 3, 3, 3], [16]),
        ("ms", [2, 2, 2, 1, 3, 3, 3], [16]),
        ("bs", [2, 2, 6, 3, 3], [2, 2, 6, 3, 3]),
    ]:
        model = make(case, structure)
        case.output(model, unet_batch(0))
        chains = get_controller(model).chain_summary()
        assert sorted(chains) == sorted(
            f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")
        )
        for kind, chain in chains.items():
            assert chain["order"] == [f"{b}.transformer_blocks.0.{kind}" for b in blocks]
            text_kv = kind in ("attn2.to_k", "attn2.to_v")
            assert chain["segments"] == (seg_text_kv if text_kv else seg_self), (structure, kind)


def test_tiny_unet_registration_order_differs_from_execution_order():
    names = [n for n, _ in CASES["unet"].build().named_modules() if n.endswith("attn1.to_q")]
    assert names[-1].startswith("mid_block")  # so chains built in registration order would be wrong


def test_config_validation_errors():
    with pytest.raises(ValueError, match="Unknown ResLoRA structure 'xs'"):
        ResLoRAConfig(structure="xs", target_modules=["q"])
    with pytest.raises(ValueError, match="pre_num=-2 is invalid"):
        ResLoRAConfig(structure="bs", pre_num=-2, target_modules=["q"])
    with pytest.raises(ValueError, match="target_modules is required"):
        ResLoRAConfig(structure="bs")
    with pytest.raises(ValueError, match="Unknown merge method"):
        model = make(CASES["sequential"], "is")
        merge_reslora(model, method="magic")
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="svd_rank must be a positive integer"):
            merge_reslora(make(CASES["sequential"], "bs"), method="ls", svd_rank=bad)
    with pytest.raises(ValueError, match="No nn.Linear matched|Target modules"):
        inject_reslora(CASES["sequential"].build(), ResLoRAConfig(target_modules=["nope"]))
