"""ggml's tensor types and llama.cpp's choice among them: block lengths, llama-quantize's file
types (plain types and mixes), the per-tensor rules of the mixes, and where a Hugging Face
model's tensors go in a GGUF file. Below formats/ and modifiers/: the GGUF writer and the
modifiers that quantize onto GGUF grids both read it."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .ops import GGUF_TYPES

# llama-quantize's file types: name -> (LlamaFileType, the default tensor type).
FILE_TYPES = {
    "F32": ("ALL_F32", "F32"), "F16": ("MOSTLY_F16", "F16"), "BF16": ("MOSTLY_BF16", "BF16"),
    "Q8_0": ("MOSTLY_Q8_0", "Q8_0"), "Q4_0": ("MOSTLY_Q4_0", "Q4_0"), "Q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "Q5_0": ("MOSTLY_Q5_0", "Q5_0"), "Q5_1": ("MOSTLY_Q5_1", "Q5_1"),
    "Q2_K": ("MOSTLY_Q2_K", "Q2_K"),
    "Q3_K_S": ("MOSTLY_Q3_K_S", "Q3_K"), "Q3_K_M": ("MOSTLY_Q3_K_M", "Q3_K"), "Q3_K_L": ("MOSTLY_Q3_K_L", "Q3_K"),
    "Q4_K_S": ("MOSTLY_Q4_K_S", "Q4_K"), "Q4_K_M": ("MOSTLY_Q4_K_M", "Q4_K"),
    "Q5_K_S": ("MOSTLY_Q5_K_S", "Q5_K"), "Q5_K_M": ("MOSTLY_Q5_K_M", "Q5_K"),
    "Q6_K": ("MOSTLY_Q6_K", "Q6_K"),
}
# llama-quantize's aliases: a K type alone names its medium mix.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FLOAT_TYPES = ("F32", "F16", "BF16")
# ggml's block types: name -> (values per block, bytes per block, values per sub-block scale,
# bits per code, symmetric) (value = scale * q + offset; the symmetric ones have no offset).
_SYMMETRIC = {"Q8_0", "Q4_0", "Q5_0", "Q3_K", "Q6_K"}
BLOCK_TYPES = {name: (*layout, name in _SYMMETRIC) for name, layout in GGUF_TYPES.items()}
# Block length (columns) of each tensor type.
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, **{name: t[0] for name, t in BLOCK_TYPES.items()}}
# llama.cpp's fallback when a row is not a multiple of a K type's 256 columns.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

def is_file_type(name) -> bool:
    return isinstance(name, str) and ALIASES.get(name.upper(), name.upper()) in FILE_TYPES


def file_type(type: str) -> str:
    """The canonical llama-quantize type name for `type` (case-insensitive, aliases resolved)."""
    if not isinstance(type, str):
        raise TypeError(f"the GGUF type must be a string such as 'Q4_K_M', got {type!r}")
    name = ALIASES.get(type.upper(), type.upper())
    if name not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; lowbit writes {', '.join(FILE_TYPES)} "
                         f"(and {', '.join(ALIASES)}, llama-quantize's names for the _M mixes)")
    return name


# ---------------------------------------------------------------- per-tensor types

@dataclasses.dataclass
class _MixState:
    """What llama.cpp's type rules count while they walk the tensors in file order."""
    n_layer: int
    n_gqa: int
    tied: bool
    seventy_b: bool  # llama.cpp's LLM_TYPE_70B: attn_v gets more bits
    has_imatrix: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixed_type(name: str, ftype: str, base: str, ncols: int, s: _MixState) -> str:
    """llama.cpp's llama_tensor_get_type for the mixes lowbit writes (dense models)."""
    new = base
    if name == "output.weight" or (s.tied and name == "token_embd.weight"):
        if ncols % BLOCK[base]:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if name == "token_embd.weight":
        return base
    if "attn_v.weight" in name:
        if ftype == "Q2_K":
            new = "Q4_K" if s.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if s.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(s.i_attention_wv, s.n_layer):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and s.i_attention_wv < 4:
            new = "Q5_K"
        if s.seventy_b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        s.i_attention_wv += 1
    elif "ffn_down" in name:
        i, n = s.i_ffn_down, s.n_layer
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and s.has_imatrix and i < n // 8:
            # llama.cpp guards the first ffn_down layers of these files when it has an imatrix
            new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        s.i_ffn_down += 1
    elif "attn_output.weight" in name:
        new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
    return new


def tensor_types(names_and_shapes: List[Tuple[str, Tuple[int, ...]]], type: str, *, n_layer: int, n_gqa: int,
                 seventy_b: bool = False, pure: bool = False, has_imatrix: bool = False) -> Dict[str, str]:
    """GGUF tensor name -> tensor type for every tensor, in file order, as llama-quantize picks
    them from an F32 file: 1-D tensors and norms stay F32; the rest take the file type's rules
    (pure: the base type everywhere; has_imatrix: the file is quantized with an importance
    matrix, which some rules look at), then llama.cpp's fallback when the row length (the last
    dimension in torch order) is not a multiple of the block."""
    ftype = file_type(type)
    base = FILE_TYPES[ftype][1]
    state = _MixState(n_layer=n_layer, n_gqa=n_gqa, seventy_b=seventy_b, has_imatrix=has_imatrix,
                      tied=not any(n == "output.weight" for n, _ in names_and_shapes))
    types = {}
    for name, shape in names_and_shapes:
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            types[name] = "F32"
            continue
        ncols = shape[-1]
        if base in FLOAT_TYPES:
            types[name] = base
            continue
        new = base if pure else _mixed_type(name, ftype, base, ncols, state)
        if ncols % BLOCK[new]:
            new = FALLBACK.get(new, new)
            if ncols % BLOCK[new]:
                new = "F16"
        types[name] = new
    return types


# Hugging Face model class -> GGUF architecture; Llama-style rotary embeddings need q / k rows
# permuted (llama.cpp rotates adjacent pairs, transformers rotates halves).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False),
}


def architecture(model: nn.Module) -> Tuple[str, bool]:
    cls = type(model).__name__
    if cls not in ARCHITECTURES:
        raise ValueError(f"lowbit writes GGUF for {', '.join(ARCHITECTURES)}, not {cls} "
                         f"(model_type {getattr(model.config, 'model_type', '?')!r}); save it as compressed-tensors "
                         "instead, or convert that checkpoint with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[cls]




def gguf_package():
    """The gguf package (llama.cpp's Python writer and reader), or an error saying how to get it."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF files need the gguf package: pip install 'lowbit[gguf]' (or pip install gguf)") from None
    return gguf


def name_map(model: nn.Module):
    """The gguf package's map from the model's Hugging Face tensor names to GGUF names."""
    gguf = gguf_package()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture(model)[0].upper()], model.config.num_hidden_layers)


def gguf_name(names, hf_name: str) -> Optional[str]:
    """GGUF name of a Hugging Face parameter name (model.layers.0.self_attn.q_proj.weight ->
    blk.0.attn_q.weight), or None."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def module_tensor_types(model: nn.Module, type: str, pure: bool = False, has_imatrix: bool = False) -> Dict[str, str]:
    """Hugging Face module name -> tensor type under llama-quantize's file `type`, for every
    Linear and embedding with a GGUF weight (the types the GGUF writer will give them)."""
    names = name_map(model)
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    by_gguf, shapes = {}, []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module_name == "lm_head" and tied:
            continue
        name = gguf_name(names, f"{module_name}.weight") if weight is not None and weight.dim() == 2 else None
        if name is None:
            continue
        by_gguf[name] = module_name
        shapes.append((name, tuple(weight.shape)))
    types = model_tensor_types(model, shapes, type, pure=pure, has_imatrix=has_imatrix)
    return {by_gguf[n]: t for n, t in types.items()}


def model_tensor_types(model: nn.Module, shapes: List[Tuple[str, Tuple[int, ...]]], type: str, pure: bool = False,
                       has_imatrix: bool = False) -> Dict[str, str]:
    """tensor_types for `model`'s GGUF tensors (name, torch shape), with the counts its rules
    read (layers, grouped-query ratio, llama.cpp's 70B class) taken from the model's config."""
    config = model.config
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    n_gqa = config.num_attention_heads // n_kv
    arch, n_layer = architecture(model)[0], config.num_hidden_layers
    # llama.cpp's LLM_TYPE_70B: a Llama of 80 layers with grouped-query attention (Llama 2 / 3 70B;
    # without GQA it is LLaMA 65B) or a Qwen2 of 80 layers (Qwen2 72B)
    seventy_b = n_layer == 80 and ((arch == "llama" and n_gqa > 1) or arch == "qwen2")
    return tensor_types(shapes, type, n_layer=n_layer, n_gqa=n_gqa, pure=pure, has_imatrix=has_imatrix,
                        seventy_b=seventy_b)


@dataclasses.dataclass
class IMatrix:
    """Per-Linear activation statistics, as llama.cpp's llama-imatrix keeps them: sums[name] is
    the sum over calibration tokens of x^2 per input column (float32), counts[name] the number
    of tokens. Names are module names (model.layers.0.self_attn.q_proj) or, read from a
    llama.cpp file, GGUF tensor names (blk.0.attn_q.weight)."""

    sums: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    datasets: List[str] = dataclasses.field(default_factory=list)

    def means(self) -> Dict[str, torch.Tensor]:
        """E[x^2] per input column, as llama-quantize divides them (float32; 1 where no token was seen)."""
        return {name: s / float(self.counts[name]) if self.counts[name] > 0 else torch.ones_like(s)
                for name, s in self.sums.items()}


def block_layout(tensor_type: str) -> Tuple[int, int]:
    """(values, bytes) of one ggml block of `tensor_type`."""
    if tensor_type in BLOCK_TYPES:
        return BLOCK_TYPES[tensor_type][:2]
    return 1, {"F32": 4, "F16": 2, "BF16": 2}[tensor_type]


def row_bytes(tensor_type: str, cols: int) -> int:
    """Bytes of one row of `cols` values in ggml's `tensor_type` blocks."""
    block, size = block_layout(tensor_type)
    if cols % block:
        raise ValueError(f"{tensor_type} stores rows in blocks of {block} values; {cols} columns are not a multiple")
    return cols // block * size
