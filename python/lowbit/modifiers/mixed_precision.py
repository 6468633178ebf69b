"""Mixed precision for a size budget: per-Linear weight schemes chosen from a sensitivity report
so that the quantized Linears fit the budget with the least total error (a knapsack, solved
exactly on a fine byte grid), then quantized through GPTQ or round-to-nearest."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Dict, Optional, Sequence

import numpy as np
from torch import nn

from ..schemes import GGUFScheme, QuantizationScheme
from .base import Modifier
from .sensitivity import (METHODS, SensitivityGatherer, SensitivityReport, check_fit, fits, option_bytes,
                          option_for_recipe, weight_options)

logger = logging.getLogger("lowbit")

# The knapsack's byte grid: the budget in this many units (each Linear's size rounded up to a
# unit, so the grid costs at most one unit per Linear of the budget; greedy repair spends it).
GRID_UNITS = 100_000
# How close to the budget the allocation must come (fraction of it).
BUDGET_TOLERANCE = 0.005

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value) -> int:
    """An int of bytes or a string with a unit: '45MB', '40 MiB', '1.5GB'."""
    if isinstance(value, bool):
        raise ValueError(f"a size must be bytes or a string such as '40MiB', got {value!r}")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write bytes or e.g. '40MiB', '45MB', '1.5GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the quantized model may take. budget (MixedPrecision's argument):
      - a number, or a string such as '3.5bpw' / '3.5 bits': average bits per weight of the
        targeted Linears, scales and zero points included;
      - {'bytes': '40MiB'} or a string with a byte unit ('40MiB', '45MB'): total stored bytes of
        the targeted Linears;
      - {'memory': '300MiB', 'context_length': 2048, 'batch_size': 1}: lowbit.eval.memory_estimate's
        total for the whole model (weights, the rest of the model, KV cache, reserve)."""

    bits: Optional[float] = None
    bytes: Optional[int] = None
    memory: Optional[int] = None
    context_length: int = 2048
    batch_size: int = 1

    @classmethod
    def parse(cls, budget) -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool):
            raise ValueError(f"budget must be bits per weight, bytes or a memory target, got {budget!r}")
        if isinstance(budget, (int, float)):
            return cls(bits=float(budget))
        if isinstance(budget, str):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(bpw|bits?|bits per weight)?\s*", budget, re.IGNORECASE)
            return cls(bits=float(m.group(1))) if m else cls(bytes=parse_bytes(budget))
        if isinstance(budget, dict):
            unknown = set(budget) - {"bits", "bytes", "memory", "context_length", "batch_size"}
            kinds = [k for k in ("bits", "bytes", "memory") if k in budget]
            if unknown or len(kinds) != 1:
                raise ValueError(f"a budget dict has one of 'bits', 'bytes' or 'memory' (with 'context_length' / "
                                 f"'batch_size' for memory), got {budget!r}")
            if "bits" in budget:
                return cls(bits=float(budget["bits"]))
            if "bytes" in budget:
                return cls(bytes=parse_bytes(budget["bytes"]))
            return cls(memory=parse_bytes(budget["memory"]), context_length=int(budget.get("context_length", 2048)),
                       batch_size=int(budget.get("batch_size", 1)))
        raise TypeError(f"budget must be bits per weight (3.5), bytes ('40MiB' or {{'bytes': ...}}) or a memory "
                        f"target ({{'memory': '300MiB', 'context_length': 2048}}), got {type(budget).__name__}")

    def __post_init__(self):
        for name in ("bits", "bytes", "memory"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"the budget's {name} must be a positive finite number, got {value!r}")

    def to_recipe(self):
        if self.bits is not None:
            return self.bits
        if self.bytes is not None:
            return {"bytes": self.bytes}
        return {"memory": self.memory, "context_length": self.context_length, "batch_size": self.batch_size}

    def linear_bytes(self, weights: int, model: Optional[nn.Module]) -> int:
        """The budget as stored bytes of the quantized Linears (`weights` weights in all)."""
        if self.bits is not None:
            return int(self.bits * weights / 8)
        if self.bytes is not None:
            return self.bytes
        if model is None:
            raise ValueError("a memory budget needs the model (its other parameters and KV cache count too)")
        from ..eval.memory import RESERVE_PERCENT, memory_estimate

        # memory_estimate with every Linear left float gives the rest: the other parameters and the KV cache
        everything = memory_estimate(model, "W8A16", ignore=[n for n, m in model.named_modules()
                                                             if isinstance(m, nn.Linear)],
                                     context_length=self.context_length, batch_size=self.batch_size)
        itemsize = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
        rest = everything.weights_bytes - weights * itemsize + everything.kv_cache_bytes
        # total = (linears + rest) * (1 + reserve)
        return int(self.memory * 100 / (100 + RESERVE_PERCENT)) - rest


@dataclasses.dataclass
class Allocation:
    """The chosen option of every Linear: choice (layer -> option label), the options'
    schemes, and what the choice costs (stored bytes, weights, summed error) against the
    budget in bytes."""

    choice: Dict[str, str]
    options: Dict[str, QuantizationScheme]
    bytes: int
    weights: int
    error: float
    budget_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights

    def counts(self) -> Dict[str, int]:
        """option label -> how many Linears got it."""
        return {label: sum(1 for c in self.choice.values() if c == label) for label in self.options}

    def schemes(self) -> Dict[str, QuantizationScheme]:
        """layer -> its scheme."""
        return {layer: self.options[label] for layer, label in self.choice.items()}

    def config_groups(self) -> dict:
        """compressed-tensors config groups, one per option used, each naming its Linears."""
        groups = {}
        for label, scheme in self.options.items():
            names = [layer for layer, chosen in self.choice.items() if chosen == label]
            if names:
                groups[label] = {"targets": names, **({"gguf": scheme.tensor_type} if isinstance(scheme, GGUFScheme)
                                                      else {"weights": scheme.weights.to_dict()})}
        return groups

    def modifier(self, method: str = "gptq", **kwargs) -> Modifier:
        """The modifier that quantizes the model with this allocation: GPTQModifier (method
        'gptq', kwargs such as dampening_frac) or QuantizationModifier ('rtn')."""
        from .gptq import GPTQModifier
        from .quantization import QuantizationModifier

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        cls = GPTQModifier if method == "gptq" else QuantizationModifier
        return cls(config_groups=self.config_groups(), **kwargs)

    def to_markdown(self) -> str:
        lines = ["| layer | option |", "|---|---|"]
        lines += [f"| {layer} | {label} |" for layer, label in self.choice.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        counts = ", ".join(f"{label}: {n}" for label, n in self.counts().items() if n)
        return (f"{len(self.choice)} Linears at {self.bits_per_weight:.3f} bits per weight ({self.bytes:,} bytes, "
                f"budget {self.budget_bytes:,}): {counts}")


ERRORS = ("loss", "relative", "output")


def allocate(report: SensitivityReport, budget, model: Optional[nn.Module] = None,
             error: str = "loss") -> Allocation:
    """The option of each Linear in `report` that minimises the summed error (error='loss': the
    estimated increase of the calibration loss, see SensitivityRow; 'relative': each Linear's
    output error relative to its output; 'output': the absolute output error) while the
    stored bytes stay within `budget` (see Budget; a memory budget needs `model`). Solved as a
    multiple-choice knapsack, exactly on a grid of GRID_UNITS byte units, then greedy repair
    spends what the grid's rounding left. A budget below every Linear's smallest option or above
    every Linear's largest is a ValueError."""
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
    table = report.table()
    if not table:
        raise ValueError("the sensitivity report is empty: no Linear was measured")
    layers = list(table)
    candidates = [sorted(table[layer].values(), key=lambda r: r.bytes) for layer in layers]
    weights = sum(c[0].weights for c in candidates)
    budget_bytes = Budget.parse(budget).linear_bytes(weights, model)
    _check_bounds(budget_bytes, sum(c[0].bytes for c in candidates), sum(c[-1].bytes for c in candidates), weights)
    cost = {"loss": lambda r: r.loss_error, "relative": lambda r: r.relative_error,
            "output": lambda r: r.output_error}[error]

    # exact DP over a byte grid: best[u] = least error of the layers so far within u units
    unit = budget_bytes / GRID_UNITS
    best = np.zeros(GRID_UNITS + 1)
    picks = np.zeros((len(layers), GRID_UNITS + 1), dtype=np.int8)
    for i, rows in enumerate(candidates):
        new = np.full(GRID_UNITS + 1, np.inf)
        for k, r in enumerate(rows):
            units = math.ceil(r.bytes / unit)
            if units > GRID_UNITS:
                continue
            trial = np.full(GRID_UNITS + 1, np.inf)
            trial[units:] = best[:GRID_UNITS + 1 - units] + cost(r)
            better = trial < new
            new[better], picks[i][better] = trial[better], k
        best = new
    if not np.isfinite(best[-1]):  # the grid's rounding left no room: start from the smallest options
        chosen = [0] * len(layers)
    else:
        chosen, u = [0] * len(layers), GRID_UNITS
        for i in range(len(layers) - 1, -1, -1):
            chosen[i] = int(picks[i][u])
            u -= math.ceil(candidates[i][chosen[i]].bytes / unit)

    # greedy repair: spend the rounding slack on the upgrades that buy the most error per byte
    total = sum(c[k].bytes for c, k in zip(candidates, chosen))
    while True:
        best_step = None
        for i, (rows, k) in enumerate(zip(candidates, chosen)):
            for j in range(k + 1, len(rows)):
                extra = rows[j].bytes - rows[k].bytes
                gain = cost(rows[k]) - cost(rows[j])
                if total + extra <= budget_bytes and gain > 0 and extra > 0:
                    ratio = gain / extra
                    if best_step is None or ratio > best_step[0]:
                        best_step = (ratio, i, j, extra)
        if best_step is None:
            break
        _, i, j, extra = best_step
        chosen[i], total = j, total + extra

    allocation = Allocation({layer: candidates[i][k].option for i, (layer, k) in enumerate(zip(layers, chosen))},
                            dict(report.options), total, weights,
                            sum(cost(c[k]) for c, k in zip(candidates, chosen)), budget_bytes)
    if budget_bytes - total > BUDGET_TOLERANCE * budget_bytes:
        logger.warning("mixed precision: the allocation takes %s of a %s budget (its Linears are too few or too "
                       "coarse to come within %.1f%%)", f"{total:,}", f"{budget_bytes:,}", 100 * BUDGET_TOLERANCE)
    return allocation


def _check_bounds(budget_bytes: int, smallest: int, largest: int, weights: int) -> None:
    if budget_bytes < smallest:
        raise ValueError(f"the budget ({_describe(budget_bytes, weights)}) is below the smallest option: every Linear at "
                         f"its fewest bits takes {_describe(smallest, weights)}; raise the budget or add a smaller "
                         "option")
    if budget_bytes > largest:
        raise ValueError(f"the budget ({_describe(budget_bytes, weights)}) is above the largest option: every Linear at "
                         f"its most bits takes {_describe(largest, weights)}; quantize uniformly with the largest "
                         "option, or add a larger one")


def _describe(nbytes: int, weights: int) -> str:
    return f"{nbytes:,} bytes, {8 * nbytes / weights:.3f} bits per weight"


class MixedPrecision(Modifier):
    """lowbit chooses each Linear's bits for a size budget: a sensitivity pass (the loss
    gradients of the float model, then one float pass layer by layer, every Linear scored under
    every option), an exact knapsack over the options for `budget` (see Budget: bits per weight,
    bytes of the Linears, or a memory target) minimising the estimated loss increase (`error`),
    then GPTQ (method 'gptq') or round-to-nearest ('rtn') with the chosen scheme per
    Linear. Options are weight-only integer schemes (presets such as 'W2A16' ... 'W8A16', or
    dicts; group_size replaces their group size), saved as compressed-tensors with one config
    group per option used, or ggml block types ('Q3_K', 'Q4_K', 'Q6_K', ...), saved with
    save_format='gguf' as a GGUF file with per-tensor types (gguf_type= names the file type
    whose rules type the tensors outside the Linears; by default the largest option's). The Linears outside the decoder layers (lm_head) are ignored by default.
    recipe.yaml holds the resulting GPTQModifier / QuantizationModifier with its config groups:
    it reproduces the quantization without the sensitivity pass. After oneshot,
    `.allocation` holds the choice and `.report` the sensitivity report."""

    requires_calibration = True

    def __init__(self, budget, options: Sequence = ("W2A16", "W3A16", "W4A16", "W8A16"), method: str = "gptq",
                 group_size: Optional[int] = None, error: str = "loss", targets="Linear", ignore=("lm_head",),
                 dampening_frac: float = 0.01, block_size: int = 128):
        super().__init__(targets, ignore)
        self.budget = Budget.parse(budget)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
        self.options = weight_options(options, group_size)
        self._given_options, self.group_size = [option_for_recipe(o) for o in options], group_size
        self.method, self.error = method, error
        self.dampening_frac, self.block_size = dampening_frac, block_size
        self.allocation: Optional[Allocation] = None
        self.report: Optional[SensitivityReport] = None

    def plan(self, model: nn.Module, calibrated: bool = False) -> Dict[str, tuple]:
        """Before the allocation: every targeted Linear with the largest option that fits it
        (what oneshot checks its output format against), once the options fit every Linear's
        columns and the budget lies between all-smallest and all-largest (checked here, before
        any data is read); after: the chosen schemes."""
        selected = self.select(model)
        if self.allocation is not None:
            return {name: (module, self.options[self.allocation.choice[name]]) for name, module in selected.items()}
        check_fit(self.options, selected)
        sizes = [[option_bytes(s, m) for s in self.options.values() if fits(s, m.in_features)]
                 for m in selected.values()]
        weights = sum(m.weight.numel() for m in selected.values())
        _check_bounds(self.budget.linear_bytes(weights, model), sum(min(s) for s in sizes), sum(max(s) for s in sizes),
                      weights)
        largest = list(self.options.values())[::-1]
        return {name: (module, next(s for s in largest if fits(s, module.in_features)))
                for name, module in selected.items()}

    def gatherer(self) -> SensitivityGatherer:
        """The sensitivity pass this modifier's allocation needs."""
        return SensitivityGatherer(self._given_options, method=self.method, group_size=self.group_size,
                                   targets=self.targets, ignore=self.ignore, block_size=self.block_size,
                                   dampening_frac=self.dampening_frac)

    def choose(self, report: SensitivityReport, model: nn.Module) -> Modifier:
        """Allocate from `report` and return the modifier that quantizes accordingly."""
        self.report = report
        self.allocation = allocate(report, self.budget, model, error=self.error)
        logger.info("mixed precision: %s", self.allocation)
        kwargs = {"dampening_frac": self.dampening_frac, "block_size": self.block_size} if self.method == "gptq" else {}
        return self.allocation.modifier(self.method, **kwargs)

    def recipe_args(self) -> dict:
        return {"budget": self.budget.to_recipe(), "options": self._given_options, "method": self.method,
                "group_size": self.group_size, "error": self.error, "targets": self.targets, "ignore": self.ignore,
                "dampening_frac": self.dampening_frac, "block_size": self.block_size}

