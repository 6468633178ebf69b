"""GGUF files for llama.cpp: the model's tensors on ggml's block grids (quantized by lowbit's
C++ packers, byte for byte what ggml's own quantizers write), its hyperparameters and its
tokenizer, so that llama.cpp (and Ollama, LM Studio, ...) run the file with nothing else.

Type names are llama-quantize's: a plain type (Q4_0, Q8_0, F16, ...) or a mix (Q2_K, Q3_K_M,
Q4_K_M, ...) whose per-tensor rules (output and attn_v / ffn_down of some layers at more bits,
32-column fallbacks for rows that are not a multiple of 256) are llama.cpp's. The `gguf`
package writes the container; lowbit computes the blocks.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import ggml, ops
from ..schemes import GGUFScheme

# ---------------------------------------------------------------- architecture

def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config, arch: Optional[str] = None) -> Tuple[Optional[float], str, Optional[float]]:
    """(rope theta, rope type, linear scaling factor) from transformers 5's config.rope_parameters
    or 4.x's rope_theta / rope_scaling. Default, linear and (for `arch` llama) Llama 3's scaling
    are written (Llama 3's as llama.cpp's rope_freqs tensor); others are refused."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": getattr(config, "rope_theta", None)}
    elif "full_attention" in params:
        params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {rope_type!r} is not written to GGUF by lowbit yet (default, linear and llama3 "
                         "are): convert this model with llama.cpp's convert_hf_to_gguf.py")
    if rope_type == "llama3" and arch not in (None, "llama"):
        raise ValueError(f"rope_type 'llama3' on a {arch} model is not something llama.cpp runs")
    theta = params.get("rope_theta")
    return (None if theta is None else float(theta)), rope_type, \
        (float(params["factor"]) if rope_type == "linear" else None)


def _rope_freqs(config) -> torch.Tensor:
    """Llama 3's rope scaling as llama.cpp takes it: per rotary frequency, the factor that
    divides it (transformers' default inverse frequencies over its Llama 3 ones)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = _rope(config)[0], _head_dim(config)
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (default / scaled).float()


def _hyperparameters(writer, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, _, linear_factor = _rope(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if linear_factor is not None:
        writer.add_rope_scaling_type(ggml.gguf_package().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_factor)


# ---------------------------------------------------------------- tokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: Optional[dict]) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE pre-tokenizer, from its
    tokenizer.json description (llama.cpp's converter hashes the tokenization of a test text to
    the same end; the structure says it without running anything)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    raise ValueError(f"lowbit cannot convert this tokenizer's pre-tokenizer to GGUF ({json.dumps(pre)[:200]}); "
                     "it knows GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE tokenizers")


def _tokenizer_spec(tokenizer, vocab_size: int) -> Tuple[dict, str]:
    """(tokenizer.json as a dict, llama.cpp's pre-tokenizer name) of a tokenizer lowbit can
    convert, or a ValueError saying why it cannot."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"lowbit converts fast (tokenizers-backed) tokenizers to GGUF, not {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "BPE":
        raise ValueError(f"lowbit converts byte-level BPE tokenizers to GGUF, not a {spec['model'].get('type')} one: "
                         "convert this model with llama.cpp's convert_hf_to_gguf.py")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    top = max(tokenizer.get_vocab().values())
    if top >= vocab_size:
        raise ValueError(f"the tokenizer has token id {top}, but the model's vocabulary is {vocab_size}: pass the "
                         "model's own tokenizer")
    return spec, pre


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.*: the byte-level BPE vocabulary (tokens, types, merges), special tokens,
    add_bos / add_eos and the chat template, as llama.cpp's converter writes them."""
    gguf = ggml.gguf_package()

    spec, pre = _tokenizer_spec(tokenizer, vocab_size)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    for kind in ("bos", "eos"):
        flag = getattr(tokenizer, f"add_{kind}_token", None)
        if isinstance(flag, bool):
            getattr(writer, f"add_add_{kind}_token")(flag)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- tensors

def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q / k reordered for llama.cpp's rotary embedding (pairs, not halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: nn.Module, permute_qk: bool) -> Iterator[Tuple[str, torch.Tensor, Optional[str]]]:
    """(GGUF name, tensor, its fixed tensor type) in the model's state-dict order: float tensors
    (type None: the file type's rules pick it) and GGUFLinear layers' blocks (their own type);
    q / k rows permuted for llama.cpp. Other quantized lowbit layers are refused."""
    from ..nn import QUANTIZED_LINEAR_TYPES, GGUFLinear

    config = model.config
    arch = ggml.architecture(model)[0]
    name_map = ggml.name_map(model)
    blocks = {}
    for module_name, module in model.named_modules():
        if isinstance(module, GGUFLinear):
            blocks[module_name] = module
        elif isinstance(module, QUANTIZED_LINEAR_TYPES):
            raise ValueError(f"{module_name} is a {type(module).__name__}, which lowbit cannot re-express on a GGUF "
                             "grid; export the float model, or quantize it with a GGUF type as scheme (e.g. "
                             "GPTQModifier(scheme='Q4_K_M')), which quantizes onto GGUF's grids")
    if _rope(config, arch)[1] == "llama3":
        yield "rope_freqs.weight", _rope_freqs(config), None
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tied = getattr(config, "tie_word_embeddings", False)
    done = set()
    for hf_name, tensor in model.state_dict().items():
        owner, _, leaf = hf_name.rpartition(".")
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq") or owner in done:
            continue
        if owner in blocks:  # the layer's weight (its blocks), then its bias
            done.add(owner)
            module = blocks[owner]
            entries = [("weight", module.blocks, module.tensor_type)]
            entries += [("bias", module.bias.detach(), None)] if module.bias is not None else []
        else:
            entries = [(leaf, tensor.detach(), None)]
        for leaf, value, tensor_type in entries:
            name = ggml.gguf_name(name_map, f"{owner}.{leaf}")
            if name is None:
                raise ValueError(f"lowbit does not know where {owner}.{leaf} goes in a {arch} GGUF file")
            kind = owner.rpartition(".")[2]
            if permute_qk and kind in heads:
                value = _permute_rows(value, heads[kind])
            yield name, value, tensor_type


def _columns(blocks: torch.Tensor, tensor_type: str) -> int:
    """Values per row of ggml blocks of `tensor_type`."""
    block, size = ggml.block_layout(tensor_type)
    return blocks.shape[1] // size * block


def _encode(tensor: torch.Tensor, tensor_type: str, importance: Optional[torch.Tensor]) -> np.ndarray:
    """One tensor's bytes (quantized types: uint8 [rows, row_bytes]) or float array."""
    if tensor_type == "F32":
        return tensor.float().contiguous().numpy()
    if tensor_type == "F16":
        return tensor.to(torch.float16).contiguous().numpy()
    if tensor_type == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
    rows = tensor.reshape(-1, tensor.shape[-1])
    return ops.gguf_quantize(rows, tensor_type, importance).numpy()


# ---------------------------------------------------------------- writing

def _check_path(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; save_gguf writes one file (e.g. {os.path.join(path, 'model.gguf')})")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"the directory {parent!r} for {path!r} does not exist")
    return path


def save_gguf(model: nn.Module, path, tokenizer=None, type: str = "Q4_K_M", imatrix=None, pure: bool = False,
              overwrite: bool = True) -> Dict[str, str]:
    """Write `model` (Llama, Mistral, Qwen2 or Qwen3) to a GGUF file at `path` that llama.cpp runs
    with nothing else: hyperparameters, `tokenizer` (required: llama.cpp needs the vocabulary)
    and the tensors on the blocks of llama-quantize's `type` (its per-tensor rules for mixes;
    pure=True: the base type everywhere), byte for byte what llama-quantize writes from the same
    float weights. Layers lowbit already quantized onto GGUF blocks (a GGUF type as a modifier's
    scheme: GPTQ, AWQ, RTN with an importance matrix) are written as they are. imatrix: an
    IMatrix (lowbit.imatrix, lowbit.load_imatrix) or a dict of GGUF / module name -> E[x^2] per
    input column, which weights ggml's scale searches as llama-quantize --imatrix does. The file
    is written beside `path` and renamed into place: a failed export leaves no file. Returns
    GGUF tensor name -> tensor type."""
    gguf = ggml.gguf_package()

    ftype = ggml.file_type(type)
    if tokenizer is None:
        raise ValueError("save_gguf needs the model's tokenizer (tokenizer=...): llama.cpp reads the vocabulary "
                         "from the GGUF file")
    path = _check_path(path)
    if not overwrite and os.path.exists(path):
        raise ValueError(f"{path!r} exists; pass overwrite=True to replace it")
    arch, permute_qk = ggml.architecture(model)
    config = model.config
    importance = _importance_by_gguf_name(model, imatrix) if imatrix is not None else {}

    tensors = list(_tensors(model, permute_qk))
    shapes = [(n, tuple(t.shape) if fixed is None else (t.shape[0], _columns(t, fixed))) for n, t, fixed in tensors]
    _check_importance(importance, dict(shapes))
    types = ggml.model_tensor_types(model, shapes, ftype, pure=pure, has_imatrix=bool(importance))
    types.update({n: fixed for n, _, fixed in tensors if fixed is not None})

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(os.path.basename(getattr(config, "_name_or_path", "") or "") or model.__class__.__name__)
        _hyperparameters(writer, config)
        writer.add_file_type(gguf.LlamaFileType[ggml.FILE_TYPES[ftype][0]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(writer, tokenizer, config.vocab_size)
        for name, tensor, fixed in tensors:
            tensor_type = types[name]
            data = tensor.numpy() if fixed is not None else _encode(tensor, tensor_type, importance.get(name))
            qtype = gguf.GGMLQuantizationType[tensor_type]
            writer.add_tensor(name, data, raw_dtype=qtype if tensor_type not in ("F32", "F16") else None)

    _write_file(path, arch, fill)
    return types


def _write_file(path: str, arch: str, fill) -> None:
    """A GGUF file filled by fill(writer), written beside `path`, synced and renamed into place:
    `path` holds the old file or the complete new one at every instant, and a failure leaves
    no temporary file behind."""
    gguf = ggml.gguf_package()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check(model: nn.Module, plan, tokenizer, gguf_type: Optional[str] = None, imatrix=None,
          pure: bool = False) -> dict:
    """write_into's options for `model`, checked before oneshot calibrates anything: the file type
    (the recipe's GGUF scheme when gguf_type is not given; plan: module name -> (module,
    scheme)), an architecture, rope settings and a tokenizer lowbit can write."""
    arch = ggml.architecture(model)[0]
    foreign = [name for name, (_, scheme) in plan.items() if not isinstance(scheme, GGUFScheme)]
    if foreign:
        raise ValueError(f"{foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''} would be quantized "
                         "with a scheme lowbit cannot re-express on a GGUF grid; with save_format='gguf' use a GGUF type "
                         "as scheme (e.g. GPTQModifier(scheme='Q4_K_M')), or save a compressed-tensors checkpoint")
    recipe_types = {scheme.file_type for _, scheme in plan.values()}
    if gguf_type is None:
        if len(recipe_types) != 1:
            raise ValueError("save_format='gguf' needs gguf_type= (e.g. 'Q4_K_M'), or a recipe whose scheme is one GGUF "
                             f"type (e.g. GPTQModifier(scheme='Q4_K_M')); the recipe has {sorted(recipe_types) or 'none'}")
        gguf_type = next(iter(recipe_types))
    ggml.file_type(gguf_type)
    _rope(model.config, arch)
    if tokenizer is None:
        raise ValueError("save_format='gguf' needs the tokenizer (tokenizer=, or one saved in the model's directory): "
                         "llama.cpp reads the vocabulary from the GGUF file")
    _tokenizer_spec(tokenizer, model.config.vocab_size)
    options = {"gguf_type": gguf_type, "pure": pure}
    return options if imatrix is None else {**options, "imatrix": imatrix}


def write_into(model: nn.Module, directory: str, tokenizer=None, gguf_type: Optional[str] = None, imatrix=None,
               pure: bool = False) -> str:
    """The model's GGUF file, model-<type>.gguf, in `directory` (the output directory being
    written; check() has vetted the options). -> the file's path."""
    if gguf_type is None:
        raise ValueError("save_format='gguf' needs gguf_type= (e.g. 'Q4_K_M')")
    path = os.path.join(directory, f"model-{ggml.file_type(gguf_type)}.gguf")
    save_gguf(model, path, tokenizer=tokenizer, type=gguf_type, imatrix=imatrix, pure=pure)
    return path


def wrote(directory: str) -> bool:
    """True when `directory` holds what write_into (and oneshot's recipe.yaml) write and nothing
    else: a directory lowbit may replace with overwrite=True."""
    files = [e for e in os.listdir(directory) if e != "recipe.yaml"]
    return bool(files) and all(re.fullmatch(r"model-[A-Z0-9_]+\.gguf", e) for e in files)


def _importance_by_gguf_name(model: nn.Module, imatrix) -> Dict[str, torch.Tensor]:
    """An IMatrix (module or GGUF names) or a dict name -> E[x^2] per input column, keyed by
    GGUF weight name."""
    means = imatrix.means() if isinstance(imatrix, ggml.IMatrix) else imatrix
    if not isinstance(means, dict):
        raise TypeError(f"imatrix must be lowbit.imatrix's IMatrix (or lowbit.load_imatrix's), got {type(imatrix).__name__}")
    arch = ggml.architecture(model)[0]
    name_map = ggml.name_map(model)
    return {_gguf_weight_name(key, name_map, arch): torch.as_tensor(values, dtype=torch.float32).contiguous()
            for key, values in means.items()}


def _check_importance(importance: Dict[str, torch.Tensor], shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Each imatrix entry names a matrix of the file (`shapes`: GGUF name -> shape) and holds one
    finite, non-negative value (a mean square or a sum of squares) per column of it."""
    for name, values in importance.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != 2:
            raise ValueError(f"imatrix entry {name!r} names no matrix of this model's GGUF file; was the imatrix made "
                             "for another model?")
        if values.dim() != 1 or values.numel() != shape[1]:
            raise ValueError(f"imatrix entry {name!r} has shape {tuple(values.shape)}, but the tensor has {shape[1]} "
                             "columns (one value per column); was the imatrix made for another model?")
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"imatrix entry {name!r} holds NaN, Inf or negative values; squares are finite and >= 0")


# ---------------------------------------------------------------- importance matrices

def save_imatrix(imatrix, path, model: nn.Module, datasets=None) -> None:
    """Write `imatrix` (lowbit.imatrix's IMatrix) in llama.cpp's imatrix GGUF format
    (<tensor>.in_sum2 and <tensor>.counts, F32), which llama-quantize --imatrix reads; module
    names become `model`'s GGUF tensor names. Written beside `path`, then renamed."""
    path = _check_path(path)
    if not isinstance(imatrix, ggml.IMatrix):
        raise TypeError(f"save_imatrix writes lowbit.imatrix's IMatrix, got {type(imatrix).__name__}")
    arch = ggml.architecture(model)[0]
    name_map = ggml.name_map(model)
    columns = {name: (0, module.in_features) for module_name, module in model.named_modules()
               if isinstance(getattr(module, "in_features", None), int)
               and (name := ggml.gguf_name(name_map, f"{module_name}.weight")) is not None}
    for key in imatrix.sums:
        count = imatrix.counts.get(key)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"imatrix entry {key!r} needs a token count (an int >= 0), got {count!r}")
    _check_importance({_gguf_weight_name(k, name_map, arch): torch.as_tensor(v).float()
                       for k, v in imatrix.sums.items()}, columns)

    def fill(writer) -> None:
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", list(datasets if datasets is not None else imatrix.datasets) or ["lowbit"])
        writer.add_uint32("imatrix.chunk_count", max(imatrix.counts.values(), default=0))
        writer.add_uint32("imatrix.chunk_size", 1)
        for key in sorted(imatrix.sums, key=_natural):
            name = _gguf_weight_name(key, name_map, arch)
            writer.add_tensor(f"{name}.in_sum2", imatrix.sums[key].float().reshape(1, -1).contiguous().numpy())
            writer.add_tensor(f"{name}.counts", np.array([[float(imatrix.counts[key])]], dtype=np.float32))

    _write_file(path, arch, fill)


def load_imatrix(path):
    """Read llama.cpp's imatrix GGUF file (llama-imatrix's or lowbit's) -> IMatrix keyed by GGUF
    tensor names. Only llama.cpp's GGUF imatrix format is read (its older .dat format is a raw
    binary dump lowbit does not parse)."""
    gguf = ggml.gguf_package()

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file (an imatrix GGUF written by llama-imatrix or lowbit.save_imatrix)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError / struct.error / ... on a bad file
        raise ValueError(f"{path!r} is not a GGUF imatrix file ({type(e).__name__}: {e})") from None
    kind = reader.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise ValueError(f"{path!r} is a GGUF file but not an imatrix (general.type is "
                         f"{kind.contents() if kind else None!r})")
    tensors = {t.name: t for t in reader.tensors}
    out = ggml.IMatrix(datasets=list(reader.fields["imatrix.datasets"].contents())
                  if "imatrix.datasets" in reader.fields else [])
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise ValueError(f"{path!r}: {base}.in_sum2 has no {base}.counts")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{path!r}: {base}'s sums and counts must be F32")
        c = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if c.size != 1:
            raise ValueError(f"{path!r}: {base} has {c.size} expert counts; lowbit reads dense models' imatrices")
        if not (np.isfinite(c[0]) and c[0] >= 0):
            raise ValueError(f"{path!r}: {base}.counts is {c[0]}, not a token count")
        out.sums[base] = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(-1).copy())
        out.counts[base] = int(round(float(c[0])))
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _gguf_weight_name(key: str, name_map, arch: str) -> str:
    if key.startswith(("blk.", "output", "token_embd")) and key.endswith(".weight"):
        return key
    name = name_map.get_name(f"{key}.weight", try_suffixes=(".weight",))
    if name is None:
        raise ValueError(f"imatrix entry {key!r} names no tensor of this {arch} model")
    return name
