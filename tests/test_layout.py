"""The package layout: the core needs only torch, peft and safetensors; one public API; no private cross-imports."""

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import reslora_diffusers

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reslora_diffusers"


def test_core_imports_and_works_without_diffusers_datasets_pil():
    """In a process where diffusers, datasets and PIL cannot be imported, the core imports, injects, trains a step
    and merges on a plain torch model, and none of the blocked packages (nor the demo) was imported."""
    code = textwrap.dedent("""
        import importlib.abc, sys

        BLOCKED = ("diffusers", "datasets", "PIL")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        import reslora_diffusers as rd

        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        rd.inject_reslora(model, rd.ResLoRAConfig(structure="is", r=2, target_modules=r"\\d+"))
        x = torch.randn(5, 8)
        model(x).pow(2).mean().backward()
        result = rd.merge_reslora(model, method="ls", calibration_batches=[x], forward_fn=lambda m, b: m(b))
        assert len(result.factors) == 4
        loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        assert not [m for m in sys.modules if m.startswith(("reslora_diffusers.demo", "reslora_diffusers.integrations"))]
        print("core ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]


def _readme_api_section():
    text = (ROOT / "README.md").read_text()
    start = text.index("## The core API")
    return text[start:text.index("\n## ", start + 1)]


def test_public_api_is_what_the_readme_documents():
    section = _readme_api_section()
    documented = set(re.findall(r"`([A-Za-z_]+)[`(]", section)) | set(re.findall(r"import ([A-Za-z_, ]+)\n", section)[0]
                                                                         .replace(" ", "").split(","))
    exported = set(reslora_diffusers.__all__)
    assert exported <= documented, f"exported but not documented: {sorted(exported - documented)}"
    importable_documented = {n for n in documented if hasattr(reslora_diffusers, n) and not n.startswith("_")}
    assert importable_documented == exported, f"documented but not in __all__: {sorted(importable_documented - exported)}"


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__all__"]
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import {private}")
    assert not offenders, offenders


def test_no_sys_path_manipulation_in_shipped_code():
    offenders = []
    for folder in ("reslora_diffusers", "benchmarks", "examples", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if re.search(r"sys\.path(\.insert|\.append|\[)", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_readme_flag_tables_name_real_flags():
    """Every flag in the README's tables is an option of the SD script, and the ResLoRA flags of the examples are the
    script's (same names, same defaults)."""
    import argparse

    from reslora_diffusers.integrations.cli import RESLORA_DEFAULTS, add_reslora_args

    help_text = subprocess.run([sys.executable, str(ROOT / "train_text_to_image_reslora.py"), "--help"],
                               capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    readme = (ROOT / "README.md").read_text()
    table_flags = set(re.findall(r"^\| `(--[a-z0-9_]+)", readme, re.M))
    assert {"--reslora_structure", "--calibration_batches", "--merge"} <= table_flags
    missing = sorted(f for f in table_flags if f not in help_text)
    assert not missing, missing
    parser = argparse.ArgumentParser()
    add_reslora_args(parser)
    defaults = vars(parser.parse_args([]))
    assert {k: defaults[k] for k in RESLORA_DEFAULTS} == RESLORA_DEFAULTS
    from examples import train_llama_reslora, train_roberta_glue_reslora

    for example in (train_llama_reslora, train_roberta_glue_reslora):
        args = vars(example.parse_args([]))
        assert {k: args[k] for k in RESLORA_DEFAULTS} == RESLORA_DEFAULTS, example.__name__
