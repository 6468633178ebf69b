"""GPTQModifier: llmcompressor's arguments, lowbit's C++ Hessian and solve."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .. import functional as F
from .. import ops
from ..nn.convert import check_scheme
from ..nn.fp8_linear import Fp8Linear
from ..nn.gguf_linear import GGUFLinear
from ..nn.int8_dynamic import Int8DynamicLinear
from ..nn.packed_linear import PackedLinear
from .. import ggml
from ..schemes import GGUFScheme, QuantizationScheme
from .base import in_layer
from .observers import reduce_average_pair
from .quantization import QuantizationModifier, static_input

logger = logging.getLogger("lowbit")
ERROR_ROWS = 1024  # rows that measure a layer's output error (GPTQModifier._output_error)


class GPTQModifier(QuantizationModifier):
    """GPTQ (Frantar et al., 2022) on the targeted Linear layers, one decoder layer at a
    time: each layer's inputs come from the already quantized layers before it. With an
    activation scheme (W8A8, W4A8, FP8_DYNAMIC), GPTQ quantizes the weights and the activations
    are quantized as QuantizationModifier's layers do (static scales calibrated on the data).
    FP8 weights (FP8, FP8_DYNAMIC, FP8_BLOCK, type 'float') are solved onto the E4M3 grid with
    round-to-nearest's tile scales. A GGUF type as scheme ("Q4_K_M", "Q3_K_M", "Q4_0", ...) solves
    each Linear onto the ggml blocks of the tensor type llama.cpp's rules give it: the block
    scales (and K-quants' sub-block scales and minimums) are fixed up front by ggml's own
    quantizer weighted by diag(H), then GPTQ's error feedback chooses the codes.

    block_size, dampening_frac (0.01: the damping starts at 1% of mean(diag H) and doubles
    while the Cholesky factorisation fails; RTN with a warning if none succeeds) and
    actorder ("static" = "weight", "group", None) as in llmcompressor. offload_hessians is
    accepted for recipe compatibility: on the CPU the Hessians already live in main memory.
    """

    requires_calibration = True

    def __init__(self, scheme=None, config_groups: Optional[dict] = None,
                 targets: Union[str, Sequence[str]] = "Linear", ignore=None, block_size: int = 128,
                 dampening_frac: float = 0.01, actorder: Optional[str] = "static", offload_hessians: bool = False,
                 **kwargs):
        super().__init__(scheme=scheme, config_groups=config_groups, targets=targets, ignore=ignore, **kwargs)
        if not 0 < dampening_frac <= 1:
            raise ValueError(f"dampening_frac must be in (0, 1], got {dampening_frac}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size, self.dampening_frac, self.actorder = block_size, dampening_frac, actorder
        self.offload_hessians = offload_hessians
        # The modifier's actorder applies to every group that does not set its own.
        self.groups = [(t, s if isinstance(s, GGUFScheme) else
                        QuantizationScheme(replace(s.weights, actorder=s.weights.actorder or actorder),
                                           s.input_activations)) for t, s in self.groups]
        if any(not isinstance(s, GGUFScheme) and s.weights.actorder == "group" for _, s in self.groups):
            warnings.warn("actorder='group' saves weight_g_idx, which compressed-tensors 0.19 (and with it stock "
                          "transformers and llmcompressor 0.14) no longer reads: such checkpoints load with "
                          "lowbit.load only. Use actorder='static' (= 'weight') for checkpoints that load everywhere.",
                          stacklevel=2)
        for _, s in self.groups:  # GPTQ on the weights, activations as QuantizationModifier quantizes them
            check_scheme(s)
        self._hessians: Dict[str, tuple] = {}
        self._last_input: tuple = (None, None)  # (the last input seen by a hook, the module that took it)
        # module name -> (GPTQ error, RTN error) on the calibration data (_output_error)
        self.layer_errors: Dict[str, tuple] = {}

    def calibration_hook(self, name: str, module: nn.Module):
        def accumulate(mod, args):
            x = args[0]
            if static_input(self._planned[name]):  # (imatrix_mse reads diag(H) instead)
                self.observe_range(name, x)
            if x is self._last_input[0]:  # q/k/v (gate/up) read the same tensor: one Hessian serves them
                self._hessians[name] = self._hessians[self._last_input[1]]
                return
            self._last_input = (x, name)
            h, n = self._hessians.get(name, (None, 0))
            try:  # upper triangle only while streaming; mirrored once in quantize_module
                self._hessians[name] = F.hessian(x.detach(), h, n, mirror=False)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

        if not isinstance(module, nn.Linear):
            raise TypeError(f"GPTQModifier quantizes nn.Linear layers; {name} is a {type(module).__name__}")
        return module.register_forward_pre_hook(accumulate)

    def reduce_statistics(self, group, prefix: str) -> None:
        """The Hessians averaged over every rank's tokens (a Hessian that q/k/v share, once)."""
        super().reduce_statistics(group, prefix)
        reduced = {}
        for name in in_layer(self._hessians, prefix):
            h, n = self._hessians[name]
            if id(h) not in reduced:
                reduced[id(h)] = reduce_average_pair(group, (h, n), f"{name} GPTQ Hessian")
            self._hessians[name] = reduced[id(h)]
        self._last_input = (None, None)

    def quantize_module(self, name: str, module: nn.Module, scheme: QuantizationScheme) -> nn.Module:
        if name not in self._hessians:
            raise ValueError(f"{name} saw no calibration data: GPTQ needs its layer to run on the dataset")
        self._last_input = (None, None)
        h, n = self._hessians.pop(name)
        F.mirror_hessian_(h)  # idempotent: a shared Hessian may be mirrored once per module
        cols = module.in_features
        if n < cols:
            warnings.warn(f"{name}: {n} calibration tokens for {cols} input columns; the Hessian is "
                          "rank-deficient (damping keeps it invertible). Give more or longer samples.", stacklevel=2)
        w = module.weight.detach()
        if isinstance(scheme, GGUFScheme):
            layer, rtn, damping = self._solve_gguf(module, scheme.tensor_type, h)
        elif scheme.weights.type == "float":
            layer, rtn, damping = self._solve_fp8(name, module, scheme, h)
        else:
            a = scheme.weights
            layer, damping = self._solve_int(name, module, scheme, h)
            rtn = F.fake_quantize(w, a.num_bits, a.symmetric, a.strategy, a.group_size, a.weight_observer)
        if damping < 0:
            warnings.warn(f"{name}: the Hessian is not positive definite even with full damping; "
                          "this layer falls back to round-to-nearest", stacklevel=2)
        elif damping > self.dampening_frac:
            logger.info("%s: damping raised to %.3g of mean(diag H)", name, damping)
        self.layer_errors[name] = (self._output_error(h, w, layer.dequantized_weight(torch.float32)),
                                   self._output_error(h, w, rtn.float()))
        logger.info("%s: output error GPTQ %.4g, RTN %.4g", name, *self.layer_errors[name])
        return layer

    def _solve_int(self, name: str, module: nn.Linear, scheme: QuantizationScheme, h: torch.Tensor):
        a, w = scheme.weights, module.weight.detach()
        result = F.gptq(w, h, bits=a.num_bits, group_size=a.group_size if a.strategy == "group" else None,
                        symmetric=a.symmetric, actorder=a.actorder, block_size=self.block_size,
                        dampening_frac=self.dampening_frac, observer=a.weight_observer)
        if Int8DynamicLinear.runs(scheme):
            layer = Int8DynamicLinear.from_codes(module, result.codes, result.scale,
                                                 input_scale=self.input_scale(name, scheme, w.dtype))
        else:
            layer = PackedLinear.from_codes(module, scheme, result.codes, result.scale, result.zero_point,
                                            result.g_idx)
        return layer, result.damping

    def _solve_fp8(self, name: str, module: nn.Linear, scheme: QuantizationScheme, h: torch.Tensor):
        """GPTQ onto the E4M3 grid: the tile scales (absmax / 448, as round-to-nearest uses)
        fixed up front, each column rounded to its nearest E4M3 value and its error fed to the
        columns not yet quantized. -> (Fp8Linear, the RTN weight, damping)."""
        a, w = scheme.weights, module.weight.detach()
        if a.actorder == "group":
            raise ValueError(f"{name}: actorder 'group' needs g_idx, which compressed-tensors' FP8 layout has no place "
                             "for; use actorder 'static' or None with FP8")
        empty = Fp8Linear(module.in_features, module.out_features, False, scheme, dtype=w.dtype)
        rows, cols = empty.block
        scale = ops.fp8_scales(w, rows, cols)
        rtn = ops.fp8_dequantize(ops.fp8_quantize(w, scale, rows, cols), scale, rows, cols, torch.float32)
        per_row = scale.float().repeat_interleave(rows, 0)[:w.shape[0]].contiguous()  # [out, column groups]
        wf, dead = w.float().clone(), torch.diag(h) == 0
        wf[:, dead] = 0  # inputs that never fire: their weights cannot matter
        perm, col_group, _, _ = F._column_groups(torch.diag(h).masked_fill(dead, 1), w.shape[1], cols, a.actorder)
        codes, _, _, damping = ops.gptq_solve(wf[:, perm].contiguous(), h, perm, per_row,
                                              torch.zeros(per_row.shape, dtype=torch.int8), col_group, 8,
                                              self.block_size, self.dampening_frac, "e4m3")
        codes = codes[:, torch.argsort(perm)].view(torch.float8_e4m3fn)
        layer = Fp8Linear.from_codes(module, scheme, codes, scale,
                                     input_scale=self.input_scale(name, scheme, w.dtype))
        return layer, rtn, damping

    def _solve_gguf(self, module: nn.Linear, tensor_type: str, h: torch.Tensor):
        """-> (GGUFLinear, the RTN weight, damping): see solve_gguf."""
        blocks, rtn, damping = solve_gguf(module.weight.detach(), h, tensor_type, self.block_size,
                                          self.dampening_frac, self.actorder)
        return GGUFLinear.from_blocks(module, tensor_type, blocks), rtn, damping

    @staticmethod
    def _output_error(h: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
        """||X W^T - X Q^T||_F / sqrt(n / 2), from the Hessian H = 2/n X^T X. A diagnostic: the
        rows are independent terms of the sum, so a layer with more than ERROR_ROWS rows is
        measured on ERROR_ROWS evenly spaced ones and scaled up (the whole sum cost a third of an
        8B layer's time at 16 x 512 calibration tokens)."""
        rows = w.shape[0]
        index = torch.linspace(0, rows - 1, ERROR_ROWS).round().long() if rows > ERROR_ROWS else slice(None)
        d = w[index].float() - q[index]
        return ((d @ h) * d).sum().clamp_min(0).mul(rows / d.shape[0]).sqrt().item()

    def recipe_args(self) -> dict:
        return {**super().recipe_args(), "block_size": self.block_size, "dampening_frac": self.dampening_frac,
                "actorder": self.actorder, "offload_hessians": self.offload_hessians}


def solve_gguf(w: torch.Tensor, h: torch.Tensor, tensor_type: str, block_size: int = 128,
               dampening_frac: float = 0.01, actorder: Optional[str] = "static"):
    """GPTQ onto ggml's blocks: ggml's quantizer, weighted by the inputs' E[x^2] = diag(H) / 2
    (llama.cpp's importance matrix), fixes every block's scales; each sub-block is then the
    affine grid scale * q + offset (q in [0, 2^bits - 1]), over which GPTQ picks the codes
    (a fractional zero point z = -offset / scale - 2^(bits - 1) on the signed codes), and the
    codes go back into ggml's blocks. -> (blocks, the RTN weight, damping)."""
    importance = (torch.diag(h) / 2).clamp_min(0).contiguous()
    blocks = ops.gguf_quantize(w, tensor_type, importance)
    rtn = ops.gguf_dequantize(blocks, tensor_type, w.shape[1], torch.float32)
    scale, offset = ops.gguf_grid(blocks, tensor_type, w.shape[1])
    _, _, sub_block, bits, _ = ggml.BLOCK_TYPES[tensor_type]
    half = 1 << (bits - 1)
    # A sub-block of zeros has scale 0: any code decodes to its offset (0 there); a tiny scale
    # keeps the solve finite and its codes harmless.
    scale = torch.where(scale == 0, torch.full_like(scale, 1e-12), scale)
    zero = (-offset / scale - half).contiguous()
    wf, dead = w.float().clone(), torch.diag(h) == 0
    wf[:, dead] = 0  # inputs that never fire: their weights cannot matter
    perm, col_group, _, _ = F._column_groups(torch.diag(h).masked_fill(dead, 1), w.shape[1], sub_block,
                                             "static" if actorder in ("static", "weight", "group") else None)
    codes, _, _, damping = ops.gptq_solve(wf[:, perm].contiguous(), h, perm, scale.contiguous(), zero, col_group,
                                          bits, block_size, dampening_frac)
    codes = (codes[:, torch.argsort(perm)].to(torch.int16) + half).to(torch.uint8)
    return ops.gguf_encode(codes, blocks, tensor_type), rtn, damping
