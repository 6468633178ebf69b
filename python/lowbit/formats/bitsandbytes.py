"""bitsandbytes checkpoints, the layouts transformers saves and loads for BitsAndBytesConfig.
load_in_4bit, for a Linear X: ``X.weight`` (packed uint8 codes), ``X.weight.absmax``,
``X.weight.quant_map`` and, with double quantization, ``X.weight.nested_absmax`` /
``X.weight.nested_quant_map``, plus ``X.weight.quant_state.bitsandbytes__<nf4|fp4>``: the UTF-8
JSON of the rest of the state. load_in_8bit (LLM.int8()): ``X.weight`` (int8 codes), ``X.SCB``
(fp32 row scales) and ``X.weight_format`` (uint8 0: row-major). The config, the tensors of
NF4Linear / Int8OutlierLinear, and their loader."""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import functional as F
from ..nn.convert import replace_module
from ..nn.int8_outlier import Int8OutlierLinear
from ..nn.nf4_linear import NF4Linear, as_dtype
from ..reference.nf4 import code as code_values

QUANT_METHOD = "bitsandbytes"
MODULE_TYPES = (NF4Linear, Int8OutlierLinear)
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def nf4_tensors(module: NF4Linear) -> Dict[str, torch.Tensor]:
    """The checkpoint tensors of one NF4Linear, named relative to the module, exactly as
    bitsandbytes' QuantState.as_dict(packed=True) writes them (the same JSON, key for key)."""
    state = {"quant_type": module.quant_type, "blocksize": module.blocksize,
             "dtype": _dtype_name(module.weight_dtype), "shape": [module.out_features, module.in_features]}
    out = {"weight": module.weight, "weight.absmax": module.absmax, "weight.quant_map": code_values(module.quant_type)}
    if module.double_quant:
        state.update(nested_blocksize=F.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=module.offset.item())
        out["weight.nested_absmax"] = module.nested_absmax
        out["weight.nested_quant_map"] = F.DYNAMIC_MAP.clone()  # cached: each entry needs its own storage
    packed_state = json.dumps(state).encode("utf-8")
    out[f"weight.{QUANT_STATE_PREFIX}{module.quant_type}"] = torch.frombuffer(bytearray(packed_state), dtype=torch.uint8)
    return out


def int8_tensors(module: Int8OutlierLinear) -> Dict[str, torch.Tensor]:
    """The checkpoint tensors of one Int8OutlierLinear, as bitsandbytes' Linear8bitLt saves them."""
    return {"weight": module.weight, "SCB": module.SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}


def module_tensors(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The checkpoint tensors of an NF4Linear or Int8OutlierLinear, named relative to it, or
    None for every other module."""
    if isinstance(module, NF4Linear):
        return nf4_tensors(module)
    if isinstance(module, Int8OutlierLinear):
        return int8_tensors(module)
    return None


def quantization_config(model: nn.Module, plan: dict) -> dict:
    """config.json's quantization_config, as transformers' BitsAndBytesConfig(load_in_4bit=True)
    (NF4Linear layers) or (load_in_8bit=True) (Int8OutlierLinear layers) .to_dict() writes it.
    llm_int8_skip_modules lists every Linear left in floating point, so transformers converts
    exactly the quantized ones."""
    skip = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in plan)
    thresholds = {s.threshold for _, s in plan.values() if hasattr(s, "threshold")}
    if thresholds:
        if len(thresholds) > 1:
            raise ValueError(f"a bitsandbytes 8-bit checkpoint has one threshold for all layers, the recipe asks "
                             f"for {sorted(thresholds)}")
        return {
            "_load_in_4bit": False, "_load_in_8bit": True, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": thresholds.pop(), "load_in_4bit": False,
            "load_in_8bit": True, "quant_method": QUANT_METHOD,
        }
    settings = {(s.quant_type, s.double_quant, s.compute_dtype) for _, s in plan.values()}
    if len(settings) > 1:
        raise ValueError("a bitsandbytes checkpoint has one quant_type, double_quant and compute_dtype for all "
                         f"layers; the recipe asks for {sorted(settings, key=str)}")
    quant_type, double_quant, compute_dtype = settings.pop()
    dtype = compute_dtype or next(m.weight.dtype for m, _ in plan.values())
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": _dtype_name(dtype),
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": QUANT_METHOD,
    }


def _bad(name: str, why: str) -> ValueError:
    return ValueError(f"bitsandbytes checkpoint: {name}: {why}; re-save the model with transformers or lowbit")


def _quant_state(state: Dict[str, torch.Tensor], name: str, module: nn.Linear) -> dict:
    keys = [k for k in state if k.startswith(f"{name}.weight.{QUANT_STATE_PREFIX}")]
    if len(keys) != 1:
        raise _bad(name, f"expected one weight.{QUANT_STATE_PREFIX}<nf4|fp4> entry, found {len(keys)}")
    try:
        meta = json.loads(bytes(state.pop(keys[0]).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(name, f"the packed quant state is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise _bad(name, "the packed quant state is not a JSON object")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
    if missing:
        raise _bad(name, f"the packed quant state lacks {missing}")
    if meta["quant_type"] not in ("nf4", "fp4") or keys[0].rsplit("__", 1)[1] != meta["quant_type"]:
        raise _bad(name, f"quant_type {meta['quant_type']!r} (key {keys[0]!r}) is not nf4 or fp4")
    if "nested_offset" in meta and (isinstance(meta["nested_offset"], bool)
                                    or not isinstance(meta["nested_offset"], (int, float))
                                    or not math.isfinite(meta["nested_offset"])):
        raise _bad(name, f"nested_offset {meta['nested_offset']!r} is not a finite number")
    if meta["shape"] != [module.out_features, module.in_features]:
        raise _bad(name, f"shape {meta['shape']} does not match the model's "
                         f"[{module.out_features}, {module.in_features}] Linear")
    return meta


def _take(state: Dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    if key not in state:
        raise _bad(name, f"{key!r} is missing")
    return state.pop(key)


def load_into(model: nn.Module, qc: dict, state: Dict[str, torch.Tensor], dtype, device) -> None:
    """Replace every Linear the checkpoint stores quantized (4-bit: a packed quant state; 8-bit:
    an SCB) by an NF4Linear / Int8OutlierLinear made on `device` ("meta" for a skeleton) and
    rewrite its entries of `state` into the module's buffer names (checked for presence, dtype
    and size). The modules keep the dtypes the checkpoint records: `dtype` is not used."""
    if bool(qc.get("load_in_8bit")) == bool(qc.get("load_in_4bit")):
        raise ValueError("a bitsandbytes quantization_config needs exactly one of load_in_4bit / load_in_8bit, got "
                         f"load_in_4bit={qc.get('load_in_4bit')!r}, load_in_8bit={qc.get('load_in_8bit')!r}")
    replaced = (_load_int8 if qc.get("load_in_8bit") else _load_4bit)(model, state, qc, device)
    orphans = [k[:-len(".weight")] for k, t in state.items()
               if k.endswith(".weight") and t.dtype in (torch.uint8, torch.int8) and k[:-len(".weight")] not in replaced]
    if orphans:
        raise _bad(orphans[0], f"the weight is stored as {state[orphans[0] + '.weight'].dtype} codes but its quant "
                               f"state (weight.{QUANT_STATE_PREFIX}<nf4|fp4> for 4-bit, SCB for 8-bit) is missing")
    if not replaced:
        raise ValueError("the bitsandbytes checkpoint holds no quantized weight (no *.weight.quant_state.bitsandbytes__* "
                         "or *.SCB entry)")


def _load_int8(model: nn.Module, state: Dict[str, torch.Tensor], qc: dict, device) -> List[str]:
    threshold = qc.get("llm_int8_threshold", 6.0)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.SCB" not in state:
            continue
        weight, scb = _take(state, f"{name}.weight", name), state[f"{name}.SCB"]
        if weight.dtype != torch.int8 or tuple(weight.shape) != (module.out_features, module.in_features):
            raise _bad(name, f"weight is {weight.dtype} {tuple(weight.shape)}, expected int8 "
                             f"({module.out_features}, {module.in_features})")
        if scb.dtype != torch.float32 or scb.numel() != module.out_features:
            raise _bad(name, f"SCB is {scb.dtype} with {scb.numel()} entries, expected float32 with "
                             f"{module.out_features} (one per output row)")
        layout = state.pop(f"{name}.weight_format", None)
        if layout is not None and int(layout) != 0:
            raise _bad(name, f"weight_format {int(layout)} is not 0 (row-major); only row-major int8 weights are read")
        try:
            with torch.device(device):
                new = Int8OutlierLinear(module.in_features, module.out_features, module.bias is not None, threshold,
                                        dtype=module.weight.dtype)
        except ValueError as e:
            raise _bad(name, str(e)) from None
        state[f"{name}.weight"] = weight
        replace_module(model, name, new)
        replaced.append(name)
    return replaced


def _load_4bit(model: nn.Module, state: Dict[str, torch.Tensor], qc: dict, device) -> List[str]:
    compute_dtype = qc.get("bnb_4bit_compute_dtype")
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not any(k.startswith(f"{name}.weight.{QUANT_STATE_PREFIX}")
                                                        for k in state):
            continue
        meta = _quant_state(state, name, module)
        nested = "nested_offset" in meta
        try:
            with torch.device(device):
                new = NF4Linear(module.in_features, module.out_features, module.bias is not None, meta["quant_type"],
                                meta["blocksize"], nested, compute_dtype, dtype=as_dtype(meta["dtype"], "dtype"))
        except (ValueError, TypeError) as e:
            raise _bad(name, f"bad quant state {meta}: {e}") from None
        quant_map = _take(state, f"{name}.weight.quant_map", name)
        if not torch.equal(quant_map.float(), code_values(meta["quant_type"])):
            raise _bad(name, f"quant_map is not bitsandbytes' {meta['quant_type']} code (custom codes are not supported)")
        tensors = {"weight": _take(state, f"{name}.weight", name), "absmax": _take(state, f"{name}.weight.absmax", name)}
        if nested:
            if meta.get("nested_blocksize") != F.NESTED_BLOCKSIZE:
                raise _bad(name, f"nested_blocksize {meta.get('nested_blocksize')} is not {F.NESTED_BLOCKSIZE}")
            if not torch.equal(_take(state, f"{name}.weight.nested_quant_map", name).float(), F.DYNAMIC_MAP):
                raise _bad(name, "nested_quant_map is not bitsandbytes' signed dynamic map")
            tensors["nested_absmax"] = _take(state, f"{name}.weight.nested_absmax", name)
            tensors["offset"] = torch.tensor(float(meta["nested_offset"]))
        for what, tensor in tensors.items():
            buffer = getattr(new, what)
            if tensor.dtype != buffer.dtype or tensor.numel() != buffer.numel():
                raise _bad(name, f"{what} is {tensor.dtype} with {tensor.numel()} entries, expected {buffer.dtype} "
                                 f"with {buffer.numel()} (quant_type {meta['quant_type']}, blocksize {meta['blocksize']})")
            state[f"{name}.{what}"] = tensor.reshape(buffer.shape)
        replace_module(model, name, new)
        replaced.append(name)
    return replaced
