"""The layering of python/lowbit, read from its imports (ast, nothing imported): formats/ has one
entry (checkpoint.py) over peer format modules that share only files.py; pipeline/ reaches the
formats through that entry; formats/ and modifiers/ never import each other and both stand on
targets.py. Then the entry's dispatch: the registry's interface, a model mixing two formats,
unknown save formats and quant methods."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Tuple

import pytest

import lowbit
from lowbit.formats import checkpoint
from lowbit.nn import replace_module
from tiny_models import make_model, w4_group_modifier

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "lowbit")


def _module_name(root: str, file: str) -> str:
    parts = os.path.relpath(file, os.path.dirname(root))[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: str) -> Dict[str, List[Tuple[str, int]]]:
    """Module name (lowbit.x.y) -> the lowbit modules it imports, with line numbers, at any
    depth (function-local imports too); `from pkg import name` counts as pkg.name when that is
    a module."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")]
    modules = {_module_name(root, f): f for f in files}
    out = {}
    for name, file in modules.items():
        is_package = file.endswith("__init__.py")
        with open(file, encoding="utf-8") as f:
            tree = ast.parse(f.read(), file)
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[:len(name.split(".")) - node.level + is_package]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for a in node.names:
                    found.append((f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target, node.lineno))
        out[name] = sorted({(m, line) for m, line in found if m.split(".")[0] == "lowbit"}, key=lambda t: t[1])
    return out


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


ENTRY = ("lowbit.formats", "lowbit.formats.checkpoint")


def _broken_rule(module: str, target: str):
    """The layering rule that `module` importing `target` breaks, or None."""
    if _under(module, "lowbit.formats") and module != "lowbit.formats.checkpoint" and _under(target, "lowbit.formats") \
            and target not in ("lowbit.formats.files", *(ENTRY if module == "lowbit.formats" else ())):
        return "in formats/, only checkpoint.py imports the format modules (files.py: anyone)"
    if _under(module, "lowbit.pipeline") and _under(target, "lowbit.formats") and target not in ENTRY:
        return "pipeline/ reaches the formats through formats.checkpoint only"
    if _under(module, "lowbit.modifiers") and _under(target, "lowbit.formats"):
        return "modifiers/ never imports formats/"
    if _under(module, "lowbit.formats") and any(_under(target, p) for p in ("lowbit.modifiers", "lowbit.pipeline")):
        return "formats/ never imports modifiers/ or pipeline/"
    if module == "lowbit.targets" and any(_under(target, p) for p in ("lowbit.formats", "lowbit.modifiers")):
        return "targets.py sits below formats/ and modifiers/"
    return None


def violations(root: str) -> List[str]:
    """Every import that breaks the layering, as 'module:line imports target (rule)'."""
    return [f"{module}:{line} imports {target} ({rule})" for module, targets in imports(root).items()
            for target, line in targets if (rule := _broken_rule(module, target))]


def test_the_import_graph_is_read():
    graph = imports(PACKAGE)
    assert {"lowbit.targets", "lowbit.formats.checkpoint", "lowbit.formats.files", "lowbit.formats.compressed_tensors",
            "lowbit.formats.bitsandbytes", "lowbit.modifiers.base", "lowbit.pipeline.oneshot"} <= set(graph)
    entry = {t for t, _ in graph["lowbit.formats.checkpoint"]}
    assert {"lowbit.formats.compressed_tensors", "lowbit.formats.bitsandbytes", "lowbit.formats.files"} <= entry
    assert "lowbit.targets" in {t for t, _ in graph["lowbit.modifiers.base"]}
    assert "lowbit.targets" in {t for t, _ in graph["lowbit.formats.compressed_tensors"]}


def test_layering():
    assert violations(PACKAGE) == []


def test_each_rule_catches_its_violation(tmp_path):
    """The rules fail on the imports they forbid (the tree of the code before the seam: a format
    importing a sibling, oneshot importing format modules, formats <-> modifiers)."""
    tree = {
        "__init__.py": "", "targets.py": "from .modifiers import base\n",
        "formats/__init__.py": "from .checkpoint import load\nfrom .bitsandbytes import load_into\n",
        "formats/checkpoint.py": "from . import bitsandbytes, compressed_tensors\nfrom .files import read_config\n",
        "formats/files.py": "", "formats/bitsandbytes.py": "from .files import read_config\n",
        "formats/compressed_tensors.py": "from . import bitsandbytes\nfrom .checkpoint import read_config\n"
                                         "from ..modifiers.base import matches\n",
        "pipeline/__init__.py": "",
        "pipeline/oneshot.py": "from ..formats import checkpoint\nfrom ..formats import bitsandbytes\n"
                               "from lowbit.formats.compressed_tensors import save\n",
        "modifiers/__init__.py": "", "modifiers/base.py": "def f():\n    from ..formats import load\n",
    }
    for path, text in tree.items():
        (tmp_path / "lowbit" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lowbit" / path).write_text(text)
    found = sorted(v.split(" (")[0] for v in violations(str(tmp_path / "lowbit")))
    assert found == sorted([
        "lowbit.targets:1 imports lowbit.modifiers.base",
        "lowbit.formats:2 imports lowbit.formats.bitsandbytes",
        "lowbit.formats.compressed_tensors:1 imports lowbit.formats.bitsandbytes",
        "lowbit.formats.compressed_tensors:2 imports lowbit.formats.checkpoint",
        "lowbit.formats.compressed_tensors:3 imports lowbit.modifiers.base",
        "lowbit.pipeline.oneshot:2 imports lowbit.formats.bitsandbytes",
        "lowbit.pipeline.oneshot:3 imports lowbit.formats.compressed_tensors",
        "lowbit.modifiers.base:2 imports lowbit.formats",
    ])


# ---------------------------------------------------------------- the entry's dispatch

def test_the_directory_formats_share_one_interface_and_no_module_type():
    for method, fmt in checkpoint.DIRECTORY_FORMATS.items():
        assert fmt.QUANT_METHOD == method
        for attr in ("quantization_config", "module_tensors", "load_into"):
            assert callable(getattr(fmt, attr)), (method, attr)
    owners = [t for fmt in checkpoint.DIRECTORY_FORMATS.values() for t in fmt.MODULE_TYPES]
    assert len(owners) == len(set(owners)) and set(owners) <= set(lowbit.nn.QUANTIZED_LINEAR_TYPES)


def test_a_model_mixing_two_formats_is_refused():
    """parse_recipe refuses such a recipe before oneshot runs; a plan put together otherwise
    is refused when its config is written."""
    model, plan = make_model("llama"), {}
    for modifier in (w4_group_modifier(ignore=["lm_head", "re:.*self_attn.*"]),
                     lowbit.BnB4bitModifier(targets=["re:.*self_attn.*"])):
        for name, (module, scheme) in modifier.plan(model).items():
            replace_module(model, name, modifier.quantize_module(name, module, scheme))
            plan[name] = (module, scheme)
    with pytest.raises(ValueError, match=r"2 checkpoint formats \(compressed-tensors: .*PackedLinear.*; "
                                         r"bitsandbytes: .*NF4Linear.*one checkpoint cannot hold both.*separate runs"):
        checkpoint.quantization_config(model, plan)


def test_unknown_save_format(tmp_path):
    model = lowbit.oneshot(make_model("llama"), w4_group_modifier())
    with pytest.raises(ValueError, match=r"save_format='onnx' is not a format lowbit writes; use one of "
                                         r"'safetensors'"):
        lowbit.save_compressed(model, tmp_path / "out", save_format="onnx")
    assert not (tmp_path / "out").exists()
    lowbit.save_compressed(model, tmp_path / "out", save_format="safetensors")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_unknown_quant_method_names_the_readable_ones(tmp_path):
    model = lowbit.oneshot(make_model("llama"), w4_group_modifier())
    model.config.quantization_config = {**model.config.quantization_config, "quant_method": "awq"}
    lowbit.save_compressed(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"lowbit.load reads checkpoints of quant_method 'compressed-tensors', "
                                         r"'bitsandbytes', not 'awq'"):
        lowbit.load(tmp_path / "ckpt")


def test_a_conv1d_only_plan_has_no_quantization_config():
    model = make_model("gpt2")
    lowbit.oneshot(model, w4_group_modifier())
    assert getattr(model.config, "quantization_config", None) is None
