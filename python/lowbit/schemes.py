"""Quantization schemes, named as llmcompressor / compressed-tensors name them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

STRATEGIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantizationScheme:
    """How the weights of a Linear are quantized (integer codes, compressed-tensors' grid).

    num_bits: 2..8. symmetric: zero point 0 (scale = absmax / ((qmax - qmin) / 2)).
    strategy: "group" (group_size input columns share a scale), "channel" (one scale per
    output row) or "tensor" (one scale). observer: "minmax" or "mse" (shrink search).
    """

    num_bits: int = 4
    symmetric: bool = True
    strategy: str = "group"
    group_size: Optional[int] = 128
    observer: str = "minmax"

    def __post_init__(self):
        if not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be an integer in 2..8, got {self.num_bits!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(
                    f"strategy 'group' needs a positive integer group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")
        if self.observer not in ("minmax", "mse"):
            raise ValueError(f"observer must be 'minmax' or 'mse', got {self.observer!r}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESET_SCHEMES = {
    "W4A16": QuantizationScheme(num_bits=4, symmetric=True, strategy="group", group_size=128),
    "W4A16_ASYM": QuantizationScheme(num_bits=4, symmetric=False, strategy="group", group_size=128),
    "W8A16": QuantizationScheme(num_bits=8, symmetric=True, strategy="channel", group_size=None),
}


def resolve_scheme(scheme: Union[str, QuantizationScheme, dict]) -> QuantizationScheme:
    """A preset name, a QuantizationScheme, or a dict of its fields."""
    if isinstance(scheme, QuantizationScheme):
        return scheme
    if isinstance(scheme, str):
        try:
            return PRESET_SCHEMES[scheme.upper()]
        except KeyError:
            raise ValueError(
                f"unknown scheme {scheme!r}; valid presets: {', '.join(PRESET_SCHEMES)}"
            ) from None
    if isinstance(scheme, dict):
        return QuantizationScheme(**scheme)
    raise TypeError(f"scheme must be a preset name, a QuantizationScheme or a dict, got {type(scheme).__name__}")
