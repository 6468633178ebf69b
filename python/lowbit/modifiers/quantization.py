"""QuantizationModifier: round-to-nearest quantization, llmcompressor's arguments."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..schemes import QuantizationScheme, args_from_dict, resolve_scheme
from .base import Modifier, _as_list


class QuantizationModifier(Modifier):
    """Quantize the targeted Linear layers with a preset `scheme` (e.g. "W4A16"), a dict
    {preset: targets}, or compressed-tensors `config_groups`
    ({name: {targets, weights, input_activations}}). No calibration data is needed (W8A8
    quantizes activations per token at run time); given data, the runner logs each layer's
    output error."""

    def __init__(self, scheme: Union[None, str, dict, QuantizationScheme] = None,
                 config_groups: Optional[dict] = None, targets: Union[str, Sequence[str]] = "Linear",
                 ignore: Union[None, str, Sequence[str]] = None, bypass_divisibility_checks: bool = False,
                 requires_calibration_data: bool = False):
        super().__init__(targets, ignore)
        if (scheme is None) == (config_groups is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of scheme= (e.g. 'W4A16') or config_groups=")
        if bypass_divisibility_checks:
            raise ValueError("bypass_divisibility_checks=True is not supported: lowbit only writes checkpoints "
                             "whose group size divides every quantized layer's input columns")
        self.scheme, self.config_groups = scheme, config_groups
        self.groups: List[Tuple[List[str], QuantizationScheme]] = self._groups()

    def _groups(self) -> List[Tuple[List[str], QuantizationScheme]]:
        if self.config_groups is not None:
            if not isinstance(self.config_groups, dict):
                raise TypeError("config_groups must be a dict of {group name: {targets, weights, input_activations}}, "
                                f"got {type(self.config_groups).__name__}")
            if not self.config_groups:
                raise ValueError("config_groups is empty: give at least one group, e.g. {'group_0': {'targets': "
                                 "['Linear'], 'weights': {'num_bits': 4, 'strategy': 'group', 'group_size': 128}}}")
            groups = []
            for name, group in self.config_groups.items():
                if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
                    raise ValueError(f"config_groups[{name!r}] needs 'targets' and a 'weights' dict of quantization "
                                     f"args, got {group!r}")
                acts = group.get("input_activations")
                if acts is not None and not isinstance(acts, dict):
                    raise ValueError(f"config_groups[{name!r}]['input_activations'] must be a dict or null, got {acts!r}")
                scheme = QuantizationScheme(args_from_dict(group["weights"]), args_from_dict(acts) if acts else None)
                groups.append((_as_list(group.get("targets", self.targets), f"config_groups[{name!r}]['targets']"),
                               scheme))
            return groups
        if isinstance(self.scheme, dict) and "weights" not in self.scheme:  # {preset: targets}
            if not self.scheme:
                raise ValueError("scheme is an empty dict: give a preset name such as 'W4A16', or {preset: targets}")
            return [(_as_list(targets, f"scheme[{preset!r}]"), resolve_scheme(preset))
                    for preset, targets in self.scheme.items()]
        return [(self.targets, resolve_scheme(self.scheme))]

    def plan(self, model: nn.Module) -> Dict[str, Tuple[nn.Module, QuantizationScheme]]:
        """Module name -> (module, scheme) for every module this modifier quantizes; the
        first config group that matches a module wins."""
        out: Dict[str, Tuple[nn.Module, QuantizationScheme]] = {}
        for targets, scheme in self.groups:
            for name, module in self.select(model, targets).items():
                out.setdefault(name, (module, scheme))
        return out

    def recipe_args(self) -> dict:
        args = {"targets": self.targets, "ignore": self.ignore}
        if self.config_groups is not None:
            args["config_groups"] = self.config_groups
        else:
            args["scheme"] = self.scheme if not isinstance(self.scheme, QuantizationScheme) else self.scheme.to_dict()
        return args
