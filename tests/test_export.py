"""Exports load in stock diffusers; SVD compression reports its true error; merges never touch base weights."""

import torch

from reslora_diffusers import ResLoRAConfig, inject_reslora, merge_reslora, save_merged_lora
from reslora_diffusers.core.merging import svd_compress
from reslora_diffusers.integrations.sd_run import TARGET_MODULES
from reslora_diffusers.demo.tiny_sd2 import load_tiny_base
from tiny_models import CASES, randomize_lora, unet_batch


def test_bs_export_loaded_by_load_lora_weights_reproduces_unmerged_unet(tmp_path):
    trained = load_tiny_base().unet
    inject_reslora(trained, ResLoRAConfig(structure="bs", pre_num=-1, r=2, lora_alpha=3, target_modules=TARGET_MODULES))
    randomize_lora(trained, scale=0.2)
    noisy, t, _ = unet_batch(0, size=8)
    hidden = torch.randn(2, 77, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = trained(noisy, t, encoder_hidden_states=hidden).sample
    result = merge_reslora(trained)
    assert max(result.ranks().values()) == 2 * 6  # the longest run of equal weight shape is 6
    save_merged_lora(result, str(tmp_path))

    pipe = load_tiny_base()  # a fresh base
    with torch.no_grad():
        base = pipe.unet(noisy, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(str(tmp_path))
        loaded = pipe.unet(noisy, t, encoder_hidden_states=hidden).sample
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(loaded, unmerged, atol=1e-5, rtol=1e-5)


def test_svd_compression_error_matches_an_independent_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 20, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g, dtype=torch.float64)
    sig = torch.linalg.svdvals(b @ a)
    for rank in (3, 8):
        a2, b2, err = svd_compress(a, b, rank)
        assert a2.shape == (rank, 20) and b2.shape == (16, rank)
        expected = (sig[rank:].square().sum() / sig.square().sum()).sqrt().item()
        assert abs(err - expected) < 1e-10
        measured = (torch.linalg.matrix_norm(b @ a - b2 @ a2) / torch.linalg.matrix_norm(b @ a)).item()
        assert abs(measured - expected) < 1e-10
    a3, b3, err = svd_compress(a, b, 12)
    assert err == 0.0 and torch.equal(a3, a)


def test_merges_leave_the_frozen_weights_unchanged():
    case = CASES["llama"]
    model = case.build()
    inject_reslora(model, ResLoRAConfig(structure="is", r=2, lora_alpha=4, target_modules=case.targets))
    randomize_lora(model, scale=0.1)
    model.train()
    with torch.no_grad():
        case.output(model, case.batch(0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for method in ("no", "bi", "bw", "ls"):
        merge_reslora(model, method=method, calibration_batches=[case.batch(1)], forward_fn=case.output)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
