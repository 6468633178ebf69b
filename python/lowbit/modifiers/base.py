"""The modifier base class: what a recipe is made of, and how it picks its modules."""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Sequence, Union

from torch import nn

from ..nn import QUANTIZED_LINEAR_TYPES
from ..nn.convert import quantize_module
from ..targets import LINEAR_TYPES, as_list, matches


class Modifier:
    """A step of a recipe. Quantizing modifiers implement `plan` (the modules they quantize)
    and `quantize_module`; transforming ones (AWQ) implement `prepare`, `layer_hooks` and
    `transform_layer`, which the layer-by-layer runner calls around each decoder layer."""

    requires_calibration = False
    # True: without requiring data, it reports statistics of all the data it is given (oneshot
    # then does not cut the data down to the few samples its error log needs).
    collects_statistics = False
    # True: the next decoder layer is fed the float outputs of this one, not the quantized ones.
    propagates_float_outputs = False
    # True: transform_layer changes the float layer (AWQ, SmoothQuant); the quantizing modifiers'
    # calibration statistics are then gathered in a second pass over the transformed layer.
    transforms_layers = False
    # True: it only measures (imatrix, sensitivity); a recipe of such modifiers quantizes nothing.
    measures_only = False

    def __init__(self, targets: Union[str, Sequence[str]] = "Linear", ignore: Union[None, str, Sequence[str]] = None):
        self.targets = as_list(targets, "targets")
        self.ignore = as_list(ignore, "ignore")
        if not self.targets:
            raise ValueError(f"{type(self).__name__} needs at least one target (for example targets='Linear')")

    def select(self, model: nn.Module, targets: Iterable[str] = None) -> Dict[str, nn.Module]:
        """The Linear-like modules of `model` matched by `targets` (default: self.targets) and
        not by `ignore`. A target that matches nothing is an error; an unused ignore warns."""
        targets = list(targets) if targets is not None else self.targets
        linear = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, LINEAR_TYPES) and not isinstance(m, QUANTIZED_LINEAR_TYPES)]
        for pattern in targets:
            if not any(matches(pattern, n, m) for n, m in linear):
                raise ValueError(
                    f"{type(self).__name__}: target {pattern!r} matches no Linear layer of {type(model).__name__} "
                    "(lowbit quantizes nn.Linear and Conv1D); use a class name ('Linear'), an exact module name, "
                    "or 're:<regex>'"
                )
        for pattern in self.ignore:
            if not any(matches(pattern, n, m) for n, m in model.named_modules() if n):
                warnings.warn(f"{type(self).__name__}: ignore entry {pattern!r} matches no module", stacklevel=3)
        return {
            n: m for n, m in linear
            if any(matches(p, n, m) for p in targets) and not any(matches(p, n, m) for p in self.ignore)
        }

    def select_linear(self, model: nn.Module) -> Dict[str, nn.Module]:
        """select(), for modifiers whose layers exist for nn.Linear only (bitsandbytes' formats
        have no layout for transformers' Conv1D): a Conv1D among the targets is an error."""
        selected = self.select(model)
        conv = [n for n, m in selected.items() if not isinstance(m, nn.Linear)]
        if conv:
            raise ValueError(f"{type(self).__name__} quantizes nn.Linear layers; {conv[:3]} are transformers Conv1D "
                             "(GPT-2 style): add them to ignore")
        return selected

    def expand(self) -> List["Modifier"]:
        """The modifiers this one stands for in a recipe (itself, plus any it implies)."""
        return [self]

    def plan(self, model: nn.Module, calibrated: bool = False) -> Dict[str, tuple]:
        """Module name -> (module, scheme) for every module this modifier quantizes (calibrated:
        oneshot has calibration data for it)."""
        return {}

    def prepare_model(self, model: nn.Module, samples: list) -> None:
        """Called once before the layer-by-layer pass with the whole float model and the
        calibration samples (for statistics that need the full model, such as gradients)."""

    def prepare(self, model: nn.Module, layer_names: Sequence[str], plan: Dict[str, tuple]) -> None:
        """Called once before calibration with the decoder layers' names and the whole plan."""

    def layer_hooks(self, prefix: str, layer: nn.Module, plan: Dict[str, tuple]) -> list:
        """Hook handles gathering what this modifier needs while decoder layer `prefix` runs
        its float pass on the calibration data."""
        return []

    def transform_layer(self, prefix: str, layer: nn.Module, plan: Dict[str, tuple]) -> None:
        """Change decoder layer `prefix` after its float pass, before it is quantized."""

    def check_distributed(self) -> None:
        """Raises ValueError when this modifier's settings cannot calibrate across processes;
        oneshot asks before it loads the model."""

    def reduce_statistics(self, group, prefix: str) -> None:
        """Distributed calibration: combine what this modifier gathered on decoder layer `prefix`
        in the pass that just ran with the other ranks' (group: pipeline.distributed.Group), so
        that every rank holds the statistics of all the samples. Modifiers that gather nothing
        keep this no-op."""

    def calibration_hook(self, name: str, module: nn.Module):
        """A hook handle that gathers what this modifier needs from `module` while the runner
        feeds its decoder layer the calibration data; None when it needs nothing."""
        return None

    def quantize_module(self, name: str, module: nn.Module, scheme) -> nn.Module:
        """The quantized replacement of `module`: round-to-nearest unless a subclass knows better."""
        return quantize_module(module, scheme)

    def recipe_args(self) -> dict:
        """The keyword arguments that rebuild this modifier (written to recipe.yaml)."""
        return {"targets": self.targets, "ignore": self.ignore}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.recipe_args().items())
        return f"{type(self).__name__}({args})"


def in_layer(names, prefix: str) -> list:
    """The names under decoder layer `prefix`, sorted: reduce_statistics walks them in the same
    order on every rank, as the collectives must."""
    return sorted(n for n in names if n.startswith(prefix + "."))


def input_hooks(prefix: str, layer: nn.Module, names, observe) -> list:
    """Forward pre-hooks on the modules of decoder layer `prefix` whose full names are in
    `names`, each calling observe(full name, its input)."""
    hooks = []
    for local, module in layer.named_modules():
        name = f"{prefix}.{local}"
        if name in names:
            hooks.append(module.register_forward_pre_hook(lambda mod, args, name=name: observe(name, args[0])))
    return hooks
