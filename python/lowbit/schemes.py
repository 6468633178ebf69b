"""Quantization schemes with compressed-tensors' names: QuantizationArgs says how one tensor
is quantized; QuantizationScheme pairs weight args with optional input-activation args;
PRESET_SCHEMES holds llmcompressor's preset names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

WEIGHT_STRATEGIES = ("tensor", "channel", "group")
ACTIVATION_STRATEGIES = ("tensor", "token")
# GPTQ column orders, llmcompressor's names ("static" is an alias of "weight").
ACTORDERS = (None, "static", "weight", "group")
OBSERVERS = ("minmax", "mse", "imatrix_mse")
# llmcompressor's observer names -> the one-shot parameters they compute for weights.
OBSERVER_ALIASES = {"memoryless_minmax": "minmax", "static_minmax": "minmax", "memoryless_mse": "mse"}


@dataclass(frozen=True)
class QuantizationArgs:
    """Integer quantization of one tensor (compressed-tensors' QuantizationArgs fields).

    num_bits: 2..8. symmetric: zero point 0 (scale = absmax / ((qmax - qmin) / 2)).
    strategy: for weights "group" (group_size input columns share a scale), "channel" (one
    scale per output row) or "tensor"; for activations "token" or "tensor". dynamic: scales
    computed at run time (activations). observer: "minmax", "mse" (range shrink search) or
    "imatrix_mse" (that search with each input column's error weighted by E[x^2] of the
    column's input on the calibration data); llmcompressor's other names map onto these.
    """

    num_bits: int = 4
    symmetric: bool = True
    strategy: str = "group"
    group_size: Optional[int] = 128
    observer: str = "minmax"
    dynamic: bool = False
    type: str = "int"
    actorder: Optional[str] = None  # GPTQ's column order: None, "static" / "weight", "group"

    def __post_init__(self):
        if isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be an integer in 2..8, got {self.num_bits!r}")
        for flag in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.type != "int":
            raise ValueError(f"only integer quantization (type 'int') is supported here, got {self.type!r}")
        valid = ACTIVATION_STRATEGIES if self.dynamic else WEIGHT_STRATEGIES
        if self.strategy not in valid:
            raise ValueError(f"strategy must be one of {valid} (dynamic={self.dynamic}), got {self.strategy!r}")
        if self.strategy == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"strategy 'group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS} (or llmcompressor's memoryless_minmax, "
                             f"static_minmax, memoryless_mse), got {self.observer!r}")
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder must be None, 'static', 'weight' or 'group', got {self.actorder!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QuantizationScheme:
    """Weight args plus, for schemes such as W8A8, dynamic input-activation args."""

    weights: QuantizationArgs
    input_activations: Optional[QuantizationArgs] = None

    def to_dict(self) -> dict:
        return {"weights": self.weights.to_dict(),
                "input_activations": self.input_activations.to_dict() if self.input_activations else None}


def _weight_only(bits: int, symmetric: bool = True) -> QuantizationScheme:
    return QuantizationScheme(QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=128))


_W8A8 = QuantizationScheme(
    QuantizationArgs(num_bits=8, symmetric=True, strategy="channel", group_size=None),
    QuantizationArgs(num_bits=8, symmetric=True, strategy="token", group_size=None, dynamic=True),
)

# The integer presets of llmcompressor / compressed-tensors: WnA16 are symmetric, group 128.
PRESET_SCHEMES = {
    **{f"W{b}A16": _weight_only(b) for b in range(2, 9)},
    "W4A16_ASYM": _weight_only(4, symmetric=False),
    "W8A8": _W8A8,
    "INT8": _W8A8,
    "W4A8": QuantizationScheme(_weight_only(4).weights, _W8A8.input_activations),
}


def plain(obj):
    """compressed-tensors' own QuantizationScheme / QuantizationArgs (pydantic models, as
    preset_name_to_scheme returns) as the dict they serialize to; anything else unchanged."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


def resolve_scheme(scheme: Union[str, QuantizationScheme, QuantizationArgs, dict]) -> QuantizationScheme:
    """A preset name, a QuantizationScheme, weight QuantizationArgs, a dict with "weights"
    (and "input_activations") in compressed-tensors' form, or compressed-tensors' own
    QuantizationScheme / QuantizationArgs objects."""
    dumped = plain(scheme)
    if dumped is not scheme and "num_bits" in dumped:  # compressed-tensors' QuantizationArgs: the weights
        dumped = {"weights": dumped}
    scheme = dumped
    if isinstance(scheme, QuantizationScheme):
        return scheme
    if isinstance(scheme, QuantizationArgs):
        return QuantizationScheme(scheme)
    if isinstance(scheme, str):
        try:
            return PRESET_SCHEMES[scheme.upper()]
        except KeyError:
            raise ValueError(f"unknown scheme {scheme!r}; valid presets: {', '.join(PRESET_SCHEMES)}") from None
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
    observer = known.get("observer")
    if isinstance(observer, str):
        known["observer"] = OBSERVER_ALIASES.get(observer, observer)
    if known.get("strategy", "group") != "group":
        known.setdefault("group_size", None)
    return QuantizationArgs(**known)
