"""Recipes in llmcompressor's forms: a modifier, a list of modifiers, a preset scheme name,
or YAML (a string or a file) with stages -> *_modifiers -> ModifierName: {kwargs}."""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Union

import yaml

from .modifiers import (BNB_PRESETS, MODIFIERS, AWQModifier, BnB4bitModifier, GPTQModifier, LLMInt8Modifier, Modifier,
                        QuantizationModifier)
from . import ggml
from .schemes import PRESET_SCHEMES

# LLM.int8() with bitsandbytes' default threshold 6.0 (transformers' load_in_8bit).
INT8_OUTLIER_PRESET = "INT8_OUTLIER"

logger = logging.getLogger("lowbit")

Recipe = Union[None, str, os.PathLike, Modifier, List[Modifier]]


def parse_recipe(recipe: Recipe, stage: Optional[str] = None) -> List[Modifier]:
    """The recipe's modifiers, in order, each expanded (AWQModifier(scheme=...) brings its
    QuantizationModifier); a recipe that only transforms gets llmcompressor's AWQ default
    quantization, W4A16_ASYM on every Linear but lm_head. stage: only that stage of a YAML
    recipe (llmcompressor's oneshot(stage=...))."""
    if stage is not None and not (isinstance(recipe, (str, os.PathLike)) and _is_yaml(recipe)):
        raise ValueError(f"stage={stage!r} selects a stage of a YAML recipe; this recipe is "
                         f"{type(recipe).__name__} {recipe!r}, which has no stages")
    modifiers = [e for m in _parse(recipe, stage) for e in m.expand()]
    bnb = [m for m in modifiers if isinstance(m, (BnB4bitModifier, LLMInt8Modifier))]
    if bnb and (len(bnb) != len(modifiers) or len({type(m) for m in bnb}) > 1):
        raise ValueError(f"{type(bnb[0]).__name__} writes a bitsandbytes checkpoint, which holds one kind of layer "
                         "(4-bit or 8-bit) and no compressed-tensors layers: use one kind of modifier per recipe")
    if any(isinstance(m, AWQModifier) for m in modifiers) \
            and not any(isinstance(m, QuantizationModifier) for m in modifiers):
        modifiers.append(QuantizationModifier(scheme="W4A16_ASYM", targets="Linear", ignore=["lm_head"]))
    if any(isinstance(m, AWQModifier) for m in modifiers) and any(isinstance(m, GPTQModifier) for m in modifiers):
        # AWQ's search compares against the float model's layer outputs, so the whole pass feeds
        # each layer the float outputs of the one before: GPTQ then builds its Hessians on them.
        logger.info("recipe with AWQModifier and GPTQModifier: every layer is calibrated on the float model's "
                    "activations (AWQ's rule), GPTQ's Hessians included")
    return modifiers


def _is_yaml(recipe) -> bool:
    return isinstance(recipe, os.PathLike) or recipe.endswith((".yaml", ".yml")) or (
        recipe.upper() not in PRESET_SCHEMES and not ggml.is_file_type(recipe) and ":" in recipe)


def _parse(recipe: Recipe, stage: Optional[str] = None) -> List[Modifier]:
    if recipe is None:
        raise ValueError("oneshot needs a recipe: a preset such as 'W4A16', a modifier, a list of modifiers, or YAML")
    if isinstance(recipe, Modifier):
        return [recipe]
    if isinstance(recipe, (list, tuple)):
        if not recipe or not all(isinstance(m, Modifier) for m in recipe):
            raise TypeError(f"a recipe list must hold lowbit modifiers, got {recipe!r}")
        return list(recipe)
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and recipe.endswith((".yaml", ".yml"))):
        if not os.path.isfile(recipe):
            raise ValueError(f"recipe file {os.fspath(recipe)!r} does not exist")
        with open(recipe, encoding="utf-8") as f:
            return _from_yaml(f.read(), stage)
    if isinstance(recipe, str):
        if recipe.upper() in PRESET_SCHEMES:
            return [QuantizationModifier(scheme=recipe.upper(), targets="Linear", ignore=["lm_head"])]
        if ggml.is_file_type(recipe) and ggml.file_type(recipe) not in ggml.FLOAT_TYPES:
            # lm_head stays float here: the GGUF writer gives it (or the tied embedding) llama.cpp's type
            return [QuantizationModifier(scheme=ggml.file_type(recipe), targets="Linear", ignore=["lm_head"])]
        if recipe.upper() in BNB_PRESETS:
            s = BNB_PRESETS[recipe.upper()]
            return [BnB4bitModifier(s.quant_type, s.blocksize, s.double_quant, targets="Linear", ignore=["lm_head"])]
        if recipe.upper() == INT8_OUTLIER_PRESET:
            return [LLMInt8Modifier(threshold=6.0, targets="Linear", ignore=["lm_head"])]
        if ":" in recipe:
            return _from_yaml(recipe, stage)
        raise ValueError(f"unknown recipe {recipe!r}: valid preset schemes are "
                         f"{', '.join([*PRESET_SCHEMES, *BNB_PRESETS, INT8_OUTLIER_PRESET])}, GGUF types "
                         f"{', '.join(t for t in ggml.FILE_TYPES if t not in ggml.FLOAT_TYPES)}; "
                         "or pass YAML, a .yaml file, or modifiers")
    raise TypeError(f"recipe must be a preset name, YAML, a path, a modifier or a list of them, got {type(recipe).__name__}")


def _from_yaml(text: str, only_stage: Optional[str] = None) -> List[Modifier]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"the recipe is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("a YAML recipe must be a mapping: <stage>: {<group>_modifiers: {ModifierName: {...}}}")
    doc = {k: v for k, v in doc.items() if k != "args"}  # the recipe's arguments (recipe_args), not a stage
    if only_stage is not None:
        if only_stage not in doc:
            raise ValueError(f"stage={only_stage!r} is not in the recipe; its stages are {sorted(map(str, doc))}")
        doc = {only_stage: doc[only_stage]}
    modifiers: List[Modifier] = []
    for stage_name, stage in doc.items():
        if not isinstance(stage, dict):
            raise ValueError(f"recipe stage {stage_name!r} must be a mapping of *_modifiers groups")
        for group_name, group in stage.items():
            if not str(group_name).endswith("_modifiers"):
                continue  # stage-level settings such as run_type
            if not isinstance(group, dict):
                raise ValueError(f"{stage_name}.{group_name} must map modifier names to their arguments")
            for name, kwargs in group.items():
                if name not in MODIFIERS:
                    raise ValueError(f"unknown modifier {name!r} in {stage_name}.{group_name}; "
                                     f"lowbit knows {', '.join(sorted(MODIFIERS))}")
                if not isinstance(kwargs, (dict, type(None))):
                    raise ValueError(f"{stage_name}.{group_name}.{name} must map argument names to values, got "
                                     f"{kwargs!r}")
                modifiers.append(MODIFIERS[name](**(kwargs or {})))
    if not modifiers:
        raise ValueError("the YAML recipe holds no modifiers (expected <stage>: {<group>_modifiers: {...}})")
    return modifiers


def recipe_to_yaml(modifiers: List[Modifier], args: Optional[dict] = None) -> str:
    """The recipe as llmcompressor writes recipe.yaml (with its `args`, oneshot's recipe_args)."""
    group = {type(m).__name__: m.recipe_args() for m in modifiers}
    doc = {"args": dict(args)} if args else {}
    doc["default_stage"] = {"default_modifiers": group}
    return yaml.safe_dump(doc, sort_keys=False)
