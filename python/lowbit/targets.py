"""llmcompressor's target grammar: which modules a recipe's targets / ignore (and a checkpoint's
config groups) name. Below formats/ and modifiers/: both read it."""

from __future__ import annotations

import re
from typing import List, Sequence, Union

from torch import nn

from .nn.convert import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def as_list(value: Union[None, str, Sequence[str]], what: str = "targets / ignore") -> List[str]:
    """A pattern or a list of patterns (module names, class names, 're:' regexes) as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a string or a list of strings (a class name such as 'Linear', a module "
                        f"name, or 're:<regex>'), got {value!r}")
    return list(value)


def in_features(module: nn.Module) -> int:
    """Input width of a Linear-like layer (Conv1D stores its weight as [in, out])."""
    return module.weight.shape[1] if isinstance(module, nn.Linear) else module.weight.shape[0]


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """llmcompressor's target grammar: 're:<regex>' (re.match on the module name), an exact
    module name, or a class name ("Linear" also covers transformers' Conv1D)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern == name or pattern == type(module).__name__:
        return True
    return pattern == "Linear" and isinstance(module, LINEAR_TYPES)
