"""Quantization schemes with compressed-tensors' names: QuantizationArgs says how one tensor
is quantized; QuantizationScheme pairs weight args with optional input-activation args;
PRESET_SCHEMES holds llmcompressor's preset names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

from . import ggml

WEIGHT_STRATEGIES = ("tensor", "channel", "group", "block")
# Dynamic activations: per token, per token group (FP8_BLOCK); static ones: one scale per tensor.
DYNAMIC_ACTIVATION_STRATEGIES = ("token", "group")
TYPES = ("int", "float")
# GPTQ column orders, llmcompressor's names ("static" is an alias of "weight").
ACTORDERS = (None, "static", "weight", "group")
# llmcompressor's observer names. For weights (quantized once) the memoryless / static / moving
# variants compute the same parameters; for static activation scales they differ (see
# modifiers/activations.py).
OBSERVERS = ("minmax", "mse", "imatrix_mse", "static_minmax", "memoryless_minmax", "memoryless_mse")
WEIGHT_OBSERVERS = {"memoryless_minmax": "minmax", "static_minmax": "minmax", "memoryless_mse": "mse"}
# E4M3's largest value: FP8 scales are absmax / FP8_MAX (compressed-tensors' float-quantized).
FP8_MAX = 448.0


@dataclass(frozen=True)
class QuantizationArgs:
    """How one tensor is quantized (compressed-tensors' QuantizationArgs fields).

    type "int": num_bits 2..8, symmetric (zero point 0, scale = absmax / ((qmax - qmin) / 2))
    or not. type "float": FP8 E4M3 (num_bits 8, symmetric, scale = absmax / 448).
    strategy: for weights "group" (group_size input columns share a scale), "channel" (one
    scale per output row), "tensor", or "block" (block_structure [rows, cols] tiles, FP8); for
    dynamic activations "token" or "group" (group_size columns of each token); static
    activations (dynamic False) use "tensor", one scale calibrated on the data.
    observer: "minmax", "mse" (range shrink search) or "imatrix_mse" (that search with each
    input column's error weighted by E[x^2] of its input); llmcompressor's memoryless_minmax,
    static_minmax and memoryless_mse too (they matter for static activation scales).
    """

    num_bits: int = 4
    symmetric: bool = True
    strategy: str = "group"
    group_size: Optional[int] = 128
    observer: str = "minmax"
    dynamic: bool = False
    type: str = "int"
    actorder: Optional[str] = None  # GPTQ's column order: None, "static" / "weight", "group"
    block_structure: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"type must be 'int' or 'float' (FP8), got {self.type!r}")
        if isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be an integer in 2..8, got {self.num_bits!r}")
        for flag in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.type == "float" and (self.num_bits != 8 or not self.symmetric):
            raise ValueError(f"type 'float' is FP8 E4M3: num_bits 8 and symmetric, got num_bits={self.num_bits}, "
                             f"symmetric={self.symmetric}")
        valid = DYNAMIC_ACTIVATION_STRATEGIES if self.dynamic else WEIGHT_STRATEGIES
        if self.strategy not in valid:
            raise ValueError(f"strategy must be one of {valid} (dynamic={self.dynamic}), got {self.strategy!r}")
        if self.strategy == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"strategy 'group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")
        if self.strategy == "block":
            b = self.block_structure
            if (not isinstance(b, tuple) or len(b) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b)):
                raise ValueError(f"strategy 'block' needs block_structure [rows, cols] of two positive integers "
                                 f"(FP8_BLOCK uses [128, 128]), got {self.block_structure!r}")
            if self.type != "float":
                raise ValueError("strategy 'block' is an FP8 layout (type 'float'); integer weights use 'group' or "
                                 "'channel'")
        elif self.block_structure is not None:
            raise ValueError(f"block_structure is only meaningful with strategy 'block', not {self.strategy!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.type == "float" and self.observer not in ("minmax", "static_minmax", "memoryless_minmax"):
            raise ValueError(f"FP8 scales are absmax / 448: use a minmax observer, not {self.observer!r}")
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder must be None, 'static', 'weight' or 'group', got {self.actorder!r}")

    @property
    def weight_observer(self) -> str:
        """The observer as it computes one-shot weight parameters: minmax, mse or imatrix_mse."""
        return WEIGHT_OBSERVERS.get(self.observer, self.observer)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_structure"] = list(self.block_structure) if self.block_structure else None
        return d


@dataclass(frozen=True)
class QuantizationScheme:
    """Weight args plus, for schemes such as W8A8, dynamic input-activation args."""

    weights: QuantizationArgs
    input_activations: Optional[QuantizationArgs] = None

    def to_dict(self) -> dict:
        return {"weights": self.weights.to_dict(),
                "input_activations": self.input_activations.to_dict() if self.input_activations else None}


@dataclass(frozen=True)
class GGUFScheme:
    """Weights on ggml's blocks (what a GGUF file stores), as llama-quantize's `file_type` (Q4_0,
    Q4_K_M, ...) lays them out: a modifier's plan gives each Linear its `tensor_type` by
    llama.cpp's per-tensor rules, unless `tensor_type` is given: then every Linear the scheme
    targets takes that block type (config_groups' {"gguf": "Q4_K"}, mixed precision's choice)."""

    file_type: str
    tensor_type: Optional[str] = None

    def __post_init__(self):
        file_type = ggml.file_type(self.file_type)  # canonical name; unknown names are a ValueError
        if file_type in ggml.FLOAT_TYPES:
            raise ValueError(f"{file_type} is a float GGUF type, not a quantization scheme: write the float model with "
                             f"lowbit.save_gguf(model, path, tokenizer=..., type={file_type!r})")
        if self.tensor_type is not None and self.tensor_type not in ggml.BLOCK_TYPES:
            raise ValueError(f"tensor_type {self.tensor_type!r} is not one of ggml's block types "
                             f"{', '.join(ggml.BLOCK_TYPES)}")
        object.__setattr__(self, "file_type", file_type)

    @property
    def search_args(self) -> QuantizationArgs:
        """The integer grid closest to the tensor type's (bits, sub-block length, symmetric), for
        searches that score candidates on an integer grid (AWQ)."""
        _, _, sub_block, bits, symmetric = ggml.BLOCK_TYPES[self.tensor_type or ggml.FILE_TYPES[self.file_type][1]]
        return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=sub_block)


def _weight_only(bits: int, symmetric: bool = True) -> QuantizationScheme:
    return QuantizationScheme(QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=128))


def _fp8(strategy: str, **kw) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, group_size=kw.pop("group_size", None), **kw)


_W8A8 = QuantizationScheme(
    QuantizationArgs(num_bits=8, symmetric=True, strategy="channel", group_size=None),
    QuantizationArgs(num_bits=8, symmetric=True, strategy="token", group_size=None, dynamic=True),
)

# llmcompressor's / compressed-tensors' presets: WnA16 are symmetric, group 128.
PRESET_SCHEMES = {
    **{f"W{b}A16": _weight_only(b) for b in range(2, 9)},
    "W4A16_ASYM": _weight_only(4, symmetric=False),
    "W8A8": _W8A8,
    "INT8": _W8A8,
    "W4A8": QuantizationScheme(_weight_only(4).weights, _W8A8.input_activations),
    # FP8 E4M3: per-tensor weights with a static per-tensor activation scale; per-channel
    # weights with dynamic per-token activations; 128x128 weight blocks with dynamic
    # per-token groups of 128. (FP8 weights only: config_groups with type float, no activations.)
    "FP8": QuantizationScheme(_fp8("tensor"), _fp8("tensor", observer="static_minmax")),
    "FP8_DYNAMIC": QuantizationScheme(_fp8("channel"), _fp8("token", dynamic=True)),
    "FP8_BLOCK": QuantizationScheme(_fp8("block", block_structure=(128, 128)),
                                    _fp8("group", group_size=128, dynamic=True)),
}


def plain(obj):
    """compressed-tensors' own QuantizationScheme / QuantizationArgs (pydantic models, as
    preset_name_to_scheme returns) as the dict they serialize to; anything else unchanged."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


def gguf_tensor_scheme(tensor_type: str) -> GGUFScheme:
    """A GGUF scheme that puts every Linear on one ggml block type (Q4_K, Q6_K, Q8_0, ...)."""
    if not isinstance(tensor_type, str) or tensor_type.upper() not in ggml.BLOCK_TYPES:
        raise ValueError(f"{tensor_type!r} is not one of ggml's block types {', '.join(ggml.BLOCK_TYPES)}")
    return GGUFScheme(ggml.file_type(tensor_type), tensor_type.upper())  # (every block type names a file type too)


def resolve_scheme(scheme: Union[str, QuantizationScheme, QuantizationArgs, dict]) -> QuantizationScheme:
    """A preset name, a QuantizationScheme, weight QuantizationArgs, a dict with "weights"
    (and "input_activations") in compressed-tensors' form, or compressed-tensors' own
    QuantizationScheme / QuantizationArgs objects."""
    dumped = plain(scheme)
    if dumped is not scheme and "num_bits" in dumped:  # compressed-tensors' QuantizationArgs: the weights
        dumped = {"weights": dumped}
    scheme = dumped
    if isinstance(scheme, (QuantizationScheme, GGUFScheme)):
        return scheme
    if isinstance(scheme, QuantizationArgs):
        return QuantizationScheme(scheme)
    if isinstance(scheme, str):
        if scheme.upper() in PRESET_SCHEMES:
            return PRESET_SCHEMES[scheme.upper()]
        if ggml.is_file_type(scheme):
            return GGUFScheme(scheme)
        raise ValueError(f"unknown scheme {scheme!r}; valid presets: {', '.join(PRESET_SCHEMES)}, and GGUF types "
                         f"{', '.join(ggml.FILE_TYPES)} (llama-quantize's names)")
    if isinstance(scheme, dict):
        if not isinstance(scheme.get("weights"), (dict, QuantizationArgs)):
            raise ValueError(f"a scheme dict needs a 'weights' entry (and optionally 'input_activations'), got keys {sorted(scheme)}")
        if scheme.get("output_activations"):
            raise ValueError("output activation quantization is not supported; quantize weights (and input "
                             "activations)")
        acts = scheme.get("input_activations")
        return QuantizationScheme(args_from_dict(scheme["weights"]), args_from_dict(acts) if acts else None)
    raise TypeError(f"scheme must be a preset name, a QuantizationScheme, QuantizationArgs or a dict, "
                    f"got {type(scheme).__name__}")


_ARG_FIELDS = set(QuantizationArgs.__dataclass_fields__)


def args_from_dict(d: Union[dict, QuantizationArgs]) -> QuantizationArgs:
    """QuantizationArgs from a compressed-tensors style dict. Fields lowbit has no use for
    (block_structure, observer_kwargs ...) are accepted while unset."""
    d = plain(d)
    if isinstance(d, QuantizationArgs):
        return d
    if not isinstance(d, dict):
        raise TypeError(f"quantization args must be a dict such as {{'num_bits': 4, 'strategy': 'group', "
                        f"'group_size': 128}}, got {type(d).__name__} {d!r}")
    extra = {k: v for k, v in d.items() if k not in _ARG_FIELDS and v not in (None, {}, False)
             and not (k == "zp_dtype" and v in ("torch.int8", "int8"))}  # int8 zero points are lowbit's too
    if extra:
        raise ValueError(f"unsupported quantization args {extra}; lowbit knows {sorted(_ARG_FIELDS)}")
    known = {k: v for k, v in d.items() if k in _ARG_FIELDS and (v is not None or k == "group_size")}
    if isinstance(known.get("block_structure"), list):
        known["block_structure"] = tuple(known["block_structure"])
    if known.get("strategy", "group") != "group":
        known.setdefault("group_size", None)
    return QuantizationArgs(**known)
