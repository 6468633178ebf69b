"""IMatrixGatherer: llmcompressor's importance-matrix pass (for the imatrix_mse observer) and
llama.cpp's importance matrix (sum of x^2 per input column of every Linear, and the token
count), which weights ggml's scale searches when a GGUF file is written."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..ggml import IMatrix
from .base import Modifier, in_layer, input_hooks
from .observers import add_squares, reduce_sum_pair


class IMatrixGatherer(Modifier):
    """Runs the calibration data through the model and records llama.cpp's importance matrix
    of every targeted Linear inside the decoder layers (`.imatrix` afterwards). It also makes
    oneshot gather E[x^2] for schemes with the imatrix_mse observer (the quantizing modifiers
    collect it themselves while the layer-sequential pass runs; GPTQ reads it from its
    Hessian's diagonal). It quantizes nothing; targets / ignore are llmcompressor's."""

    requires_calibration = True
    collects_statistics = True
    measures_only = True

    def __init__(self, targets="Linear", ignore=None):
        super().__init__(targets, ignore)
        self._selected: set = set()
        self._squares: Dict[str, Tuple[torch.Tensor, int]] = {}  # name -> (sum of x^2 [in], tokens)

    def prepare(self, model: nn.Module, layer_names, plan) -> None:
        self._selected = set(self.select(model))
        self._squares = {}

    def layer_hooks(self, prefix: str, layer: nn.Module, plan) -> list:
        return input_hooks(prefix, layer, self._selected, lambda name, x: add_squares(self._squares, name, x))

    def reduce_statistics(self, group, prefix: str) -> None:
        for name in in_layer(self._squares, prefix):
            self._squares[name] = reduce_sum_pair(group, self._squares[name], f"{name} E[x^2]")

    @property
    def imatrix(self) -> IMatrix:
        return IMatrix({n: s.float() for n, (s, _) in self._squares.items()},
                       {n: count for n, (_, count) in self._squares.items()})
