"""Direct calls of every raw op (torch.ops.lowbit.*) with bad arguments: each must raise
ValueError / TypeError (RuntimeError / NotImplementedError only where torch's dispatcher itself
refuses), or give the right answer, never crash, hang or read out of bounds, whatever the
Python layer (lowbit.functional) would have passed.

The calls run in a child process (one for the whole table, restarted after a crash), so a
segfault fails its case instead of killing pytest. Each case prints one JSON line."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

# The child loads just the extension, the fake kernels and the references (lowbit's package
# import pulls in transformers: seconds); the parent tells it where they are.
_CHILD_ENV = "_LOWBIT_RAW_OPS_CHILD"
if os.environ.get(_CHILD_ENV):
    _so, _pkg = os.environ[_CHILD_ENV].split(os.pathsep)
    torch.ops.load_library(_so)

    def _load(name, rel):
        spec = importlib.util.spec_from_file_location(name, os.path.join(_pkg, rel))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    lowbit_ops = _load("_raw_ops_lowbit_ops", "ops.py")  # registers the fake kernels
    ref_quant, ref_int8, ref_nf4 = (_load(f"_raw_ops_ref_{n}", f"reference/{n}.py") for n in ("quant", "int8", "nf4"))
else:
    import lowbit
    from lowbit import ops as lowbit_ops
    from lowbit.reference import int8 as ref_int8
    from lowbit.reference import nf4 as ref_nf4
    from lowbit.reference import quant as ref_quant

L = torch.ops.lowbit
I8, U8, I32, I64, F32, F16, BF16, F64 = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.float32,
                                         torch.float16, torch.bfloat16, torch.float64)
BIG = 1 << 62


def _valid():
    """Small valid arguments for every op (rows 6, cols 64, groups of 32)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    s, z = L.quant_params(w, 4, False, 32)
    codes = L.quantize(w, s, z, 4, 32)
    x = torch.randn(3, 64, generator=g)
    nf4_packed, nf4_absmax = L.nf4_quantize(w, 32, "nf4")
    dyn = ref_nf4.dynamic_map()  # bitsandbytes' 8-bit map, as lowbit.functional uses it
    dq_codes, dq_nested = L.blockwise8_quantize(nf4_absmax - 0.25, dyn, 256)
    xs = torch.randn(40, 64, generator=g)
    h = (xs.t() @ xs) / 40
    wq, scb = w.mul(127 / w.abs().amax(1, keepdim=True)).round().to(I8), w.abs().amax(1)
    return dict(
        w=w, s=s, z=z, codes=codes, packed=L.pack(codes, 4), x=x, bias=torch.randn(6, generator=g),
        nf4_packed=nf4_packed, nf4_absmax=nf4_absmax, dyn=dyn, dq_codes=dq_codes, dq_nested=dq_nested,
        offset=torch.tensor(0.25), h=h, xs=xs, perm=torch.arange(64), col_group=torch.arange(64) // 32,
        factor=L.awq_gram_factor(h), scales=torch.rand(64, generator=g) + 0.5, wq=wq, scb=scb,
        a=torch.randint(-128, 128, (3, 64), dtype=I8, generator=g),
        b=torch.randint(-128, 128, (5, 64), dtype=I8, generator=g),
        fs=L.fp8_scales(w, 1, 64), fq=L.fp8_quantize(w, L.fp8_scales(w, 1, 64), 1, 64),
        gb=L.gguf_quantize(w, "Q4_0"), gc=torch.randint(0, 16, (6, 64), dtype=U8, generator=g),
    )


def _nc(t):
    """The same values in a non-contiguous layout (transposed storage)."""
    if t.dim() == 1:
        return torch.stack([t, t], 1)[:, 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _meta(*ts):
    return [t.to("meta") if isinstance(t, torch.Tensor) else t for t in ts]


V = None  # the valid arguments, built once per child process


# Each case: (kind, fn(v)). kind "value" / "type": that exception; "error": either of them;
# "dispatch": also RuntimeError (torch's own schema check); "same": fn returns (got, want), which
# must match; "meta": fn's tensor outputs must all be meta tensors. Ops without a fake kernel
# (lowbit.ops.NO_FAKE) raise ValueError for meta tensors.
CASES = {
    # ------------------------------------------------------------ quant_params
    "quant_params/bits-9": ("value", lambda v: L.quant_params(v["w"], 9, True, 32)),
    "quant_params/bits-1": ("value", lambda v: L.quant_params(v["w"], 1, True, 32)),
    "quant_params/1d": ("value", lambda v: L.quant_params(v["w"].reshape(-1), 4, True, 32)),
    "quant_params/int": ("type", lambda v: L.quant_params(v["codes"], 4, True, 32)),
    "quant_params/float64": ("type", lambda v: L.quant_params(v["w"].double(), 4, True, 32)),
    "quant_params/group-0": ("value", lambda v: L.quant_params(v["w"], 4, True, 0)),
    "quant_params/group-neg": ("value", lambda v: L.quant_params(v["w"], 4, True, -32)),
    "quant_params/group-48": ("value", lambda v: L.quant_params(v["w"], 4, True, 48)),
    "quant_params/observer": ("value", lambda v: L.quant_params(v["w"], 4, True, 32, "max")),
    "quant_params/grid-0": ("value", lambda v: L.quant_params(v["w"], 4, True, 32, "mse", 0.8, 0, 2.4)),
    "quant_params/grid-huge": ("value", lambda v: L.quant_params(v["w"], 4, True, 32, "mse", 0.8, 1 << 40, 2.4)),
    "quant_params/maxshrink-2": ("value", lambda v: L.quant_params(v["w"], 4, True, 32, "mse", 2.0, 100, 2.4)),
    "quant_params/norm-nan": ("value", lambda v: L.quant_params(v["w"], 4, True, 32, "mse", 0.8, 100, math.nan)),
    "quant_params/norm-inf": ("value", lambda v: L.quant_params(v["w"], 4, True, 32, "mse", 0.8, 100, math.inf)),
    "quant_params/bits-str": ("dispatch", lambda v: L.quant_params(v["w"], "4", True, 32)),
    "quant_params/noncontig": ("same", lambda v: (L.quant_params(_nc(v["w"]), 4, False, 32),
                                                  L.quant_params(v["w"], 4, False, 32))),
    "quant_params/empty-rows": ("same", lambda v: (L.quant_params(v["w"][:0], 4, False, 32),
                                                   (torch.empty(0, 2), torch.empty(0, 2, dtype=I8)))),
    "quant_params/meta": ("meta", lambda v: L.quant_params(v["w"].to("meta"), 4, False, 32)),
    # ------------------------------------------------------------ quantize / dequantize / fake_quantize
    "quantize/bits-1": ("value", lambda v: L.quantize(v["w"], v["s"], v["z"], 1, 32)),
    "quantize/scale-transposed": ("value", lambda v: L.quantize(v["w"], v["s"].t().contiguous(), None, 4, 32)),
    "quantize/scale-flat": ("value", lambda v: L.quantize(v["w"], v["s"].reshape(-1), None, 4, 32)),
    "quantize/scale-groups": ("value", lambda v: L.quantize(v["w"], v["s"][:, :1], None, 4, 32)),
    "quantize/scale-int": ("type", lambda v: L.quantize(v["w"], v["s"].int(), None, 4, 32)),
    "quantize/zero-float": ("type", lambda v: L.quantize(v["w"], v["s"], v["z"].float(), 4, 32)),
    "quantize/zero-shape": ("value", lambda v: L.quantize(v["w"], v["s"], v["z"][:, :1], 4, 32)),
    "quantize/zero-transposed": ("value", lambda v: L.quantize(v["w"], v["s"], v["z"].t().contiguous(), 4, 32)),
    "quantize/w-int": ("type", lambda v: L.quantize(v["codes"], v["s"], v["z"], 4, 32)),
    "quantize/w-3d": ("value", lambda v: L.quantize(v["w"].reshape(2, 3, 64), v["s"], v["z"], 4, 32)),
    "quantize/zero-int32": ("same", lambda v: (L.quantize(v["w"], v["s"], v["z"].int(), 4, 32),
                                               L.quantize(v["w"], v["s"], v["z"], 4, 32))),
    "quantize/noncontig": ("same", lambda v: (L.quantize(_nc(v["w"]), _nc(v["s"]), _nc(v["z"]), 4, 32),
                                              ref_quant.quantize(v["w"], v["s"], v["z"], 4, 32))),
    "quantize/mixed-meta": ("value", lambda v: L.quantize(v["w"], v["s"].to("meta"), v["z"], 4, 32)),
    "quantize/meta": ("meta", lambda v: L.quantize(*_meta(v["w"], v["s"], v["z"]), 4, 32)),
    "dequantize/dtype-int": ("type", lambda v: L.dequantize(v["codes"], v["s"], v["z"], 32, I32)),
    "dequantize/dtype-float64": ("type", lambda v: L.dequantize(v["codes"], v["s"], v["z"], 32, F64)),
    "dequantize/codes-uint8": ("type", lambda v: L.dequantize(v["codes"].to(U8), v["s"], v["z"], 32, F32)),
    "dequantize/codes-3d": ("value", lambda v: L.dequantize(v["codes"].reshape(2, 3, 64), v["s"], v["z"], 32, F32)),
    "dequantize/scale-transposed": ("value", lambda v: L.dequantize(v["codes"], v["s"].t().contiguous(), None,
                                                                    32, F32)),
    "dequantize/group-0": ("value", lambda v: L.dequantize(v["codes"], v["s"], v["z"], 0, F32)),
    "dequantize/noncontig": ("same", lambda v: (L.dequantize(_nc(v["codes"]), _nc(v["s"]), _nc(v["z"]), 32, F32),
                                                ref_quant.dequantize(v["codes"], v["s"], v["z"], 32, F32))),
    "dequantize/mixed-meta": ("value", lambda v: L.dequantize(v["codes"].to("meta"), v["s"], v["z"], 32, F32)),
    "fake_quantize/scale-transposed": ("value", lambda v: L.fake_quantize(v["w"], v["s"].t().contiguous(), None,
                                                                          4, 32)),
    "fake_quantize/zero-shape": ("value", lambda v: L.fake_quantize(v["w"], v["s"], v["z"].reshape(-1), 4, 32)),
    "fake_quantize/noncontig": ("same", lambda v: (L.fake_quantize(_nc(v["w"]), v["s"], v["z"], 4, 32),
                                                   L.fake_quantize(v["w"], v["s"], v["z"], 4, 32))),
    "fake_quantize/mixed-meta": ("value", lambda v: L.fake_quantize(v["w"], v["s"], v["z"].to("meta"), 4, 32)),
    # ------------------------------------------------------------ pack / unpack
    "pack/out-of-range": ("value", lambda v: L.pack(torch.full((2, 8), 9, dtype=I8), 4)),
    "pack/3d": ("value", lambda v: L.pack(v["codes"].reshape(2, 3, 64), 4)),
    "pack/int32": ("type", lambda v: L.pack(v["codes"].int(), 4)),
    "pack/bits-9": ("value", lambda v: L.pack(v["codes"], 9)),
    "pack/noncontig": ("same", lambda v: (L.pack(_nc(v["codes"]), 4), ref_quant.pack(v["codes"], 4))),
    "pack/noncontig-3bit": ("same", lambda v: (L.pack(_nc(v["codes"].clamp(-4, 3)), 3),
                                               ref_quant.pack(v["codes"].clamp(-4, 3), 3))),
    "pack/empty": ("same", lambda v: (L.pack(v["codes"][:0], 4), torch.empty(0, 8, dtype=I32))),
    "pack/meta": ("meta", lambda v: L.pack(v["codes"].to("meta"), 4)),
    "unpack/cols-mismatch": ("value", lambda v: L.unpack(v["packed"], 4, 72)),
    "unpack/cols-negative": ("value", lambda v: L.unpack(v["packed"], 4, -8)),
    "unpack/cols-huge": ("value", lambda v: L.unpack(v["packed"], 8, (1 << 61) + 2)),
    "unpack/int64": ("type", lambda v: L.unpack(v["packed"].long(), 4, 64)),
    "unpack/1d": ("value", lambda v: L.unpack(v["packed"].reshape(-1), 4, 64)),
    "unpack/noncontig": ("same", lambda v: (L.unpack(_nc(v["packed"]), 4, 64), v["codes"])),
    # ------------------------------------------------------------ packed_linear
    "packed_linear/k-mismatch": ("value", lambda v: L.packed_linear(torch.randn(3, 96), v["packed"], v["s"], v["z"],
                                                                    4, 32, None)),
    "packed_linear/words": ("value", lambda v: L.packed_linear(v["x"], v["packed"][:, :7], v["s"], v["z"], 4, 32,
                                                               None)),
    "packed_linear/scale-transposed": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"].t().contiguous(),
                                                                          None, 4, 32, None)),
    "packed_linear/scale-int": ("type", lambda v: L.packed_linear(v["x"], v["packed"], v["s"].int(), None, 4, 32,
                                                                  None)),
    "packed_linear/zero-float": ("type", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"].float(), 4, 32,
                                                                   None)),
    "packed_linear/zero-shape": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"].reshape(-1),
                                                                    4, 32, None)),
    "packed_linear/bias-5": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 32,
                                                                v["bias"][:5])),
    "packed_linear/bias-2d": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 32,
                                                                 v["bias"].reshape(1, 6))),
    "packed_linear/bias-int": ("type", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 32,
                                                                 v["bias"].int())),
    "packed_linear/packed-int64": ("type", lambda v: L.packed_linear(v["x"], v["packed"].long(), v["s"], v["z"], 4,
                                                                     32, None)),
    "packed_linear/x-int": ("type", lambda v: L.packed_linear(v["codes"], v["packed"], v["s"], v["z"], 4, 32, None)),
    "packed_linear/x-0d": ("value", lambda v: L.packed_linear(torch.tensor(1.0), v["packed"], v["s"], v["z"], 4, 32,
                                                              None)),
    "packed_linear/group-0": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 0, None)),
    "packed_linear/group-48": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 48, None)),
    "packed_linear/bits-9": ("value", lambda v: L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 9, 32, None)),
    "packed_linear/noncontig": ("same", lambda v: (
        L.packed_linear(_nc(v["x"]), _nc(v["packed"]), _nc(v["s"]), _nc(v["z"]), 4, 32, _nc(v["bias"])),
        ref_quant.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 32, v["bias"]))),
    "packed_linear/zero-int32": ("same", lambda v: (L.packed_linear(v["x"], v["packed"], v["s"], v["z"].int(), 4, 32,
                                                                    None),
                                                    L.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 32, None))),
    "packed_linear/3d": ("same", lambda v: (
        L.packed_linear(v["x"].reshape(3, 1, 64), v["packed"], v["s"], v["z"], 4, 32, None),
        ref_quant.packed_linear(v["x"], v["packed"], v["s"], v["z"], 4, 32).reshape(3, 1, 6))),
    "packed_linear/empty": ("same", lambda v: (L.packed_linear(v["x"][:0], v["packed"], v["s"], v["z"], 4, 32, None),
                                               torch.empty(0, 6))),
    "packed_linear/mixed-meta": ("value", lambda v: L.packed_linear(v["x"], v["packed"].to("meta"), v["s"], v["z"], 4,
                                                                    32, None)),
    "packed_linear/mixed-meta-bias": ("value", lambda v: L.packed_linear(*_meta(v["x"], v["packed"], v["s"], v["z"]),
                                                                         4, 32, v["bias"])),
    "packed_linear/meta": ("meta", lambda v: L.packed_linear(*_meta(v["x"], v["packed"], v["s"], v["z"]), 4, 32,
                                                             None)),
    # ------------------------------------------------------------ GPTQ
    "gptq_hessian_/float64": ("type", lambda v: L.gptq_hessian_(torch.zeros(64, 64, dtype=F64), v["xs"], 0, True)),
    "gptq_hessian_/shape": ("value", lambda v: L.gptq_hessian_(torch.zeros(64, 32), v["xs"], 0, True)),
    "gptq_hessian_/size": ("value", lambda v: L.gptq_hessian_(torch.zeros(32, 32), v["xs"], 0, True)),
    "gptq_hessian_/noncontig-h": ("value", lambda v: L.gptq_hessian_(torch.zeros(64, 128)[:, ::2], v["xs"], 0, True)),
    "gptq_hessian_/inputs-int": ("type", lambda v: L.gptq_hessian_(torch.zeros(64, 64), v["codes"], 0, True)),
    "gptq_hessian_/inputs-empty": ("value", lambda v: L.gptq_hessian_(torch.zeros(64, 64), v["xs"][:0], 0, True)),
    "gptq_hessian_/inputs-0d": ("value", lambda v: L.gptq_hessian_(torch.zeros(1, 1), torch.tensor(1.0), 0, True)),
    "gptq_hessian_/samples-neg": ("value", lambda v: L.gptq_hessian_(torch.zeros(64, 64), v["xs"], -1, True)),
    "gptq_hessian_/samples-overflow": ("value", lambda v: L.gptq_hessian_(torch.zeros(64, 64), v["xs"],
                                                                          (1 << 63) - 5, True)),
    "gptq_hessian_/alias": ("value", lambda v: (lambda h: L.gptq_hessian_(h, h, 0, True))(torch.rand(64, 64))),
    "gptq_hessian_/noncontig-inputs": ("same", lambda v: (
        (lambda h: (h, L.gptq_hessian_(h, _nc(v["xs"]), 3, True)))(torch.eye(64)),
        (lambda h: (h, L.gptq_hessian_(h, v["xs"], 3, True)))(torch.eye(64)))),
    "gptq_hessian_/mixed-meta": ("value", lambda v: L.gptq_hessian_(torch.zeros(64, 64, device="meta"), v["xs"], 0,
                                                                    True)),
    "gptq_hessian_/meta": ("meta", lambda v: (L.gptq_hessian_(*_meta(torch.zeros(64, 64), v["xs"]), 0, True),)),
    "hessian_mirror_/float64": ("type", lambda v: L.hessian_mirror_(torch.zeros(8, 8, dtype=F64))),
    "hessian_mirror_/nonsquare": ("value", lambda v: L.hessian_mirror_(torch.zeros(8, 9))),
    "hessian_mirror_/1d": ("value", lambda v: L.hessian_mirror_(torch.zeros(8))),
    "hessian_mirror_/noncontig": ("value", lambda v: L.hessian_mirror_(torch.zeros(8, 16)[:, ::2])),
    "hessian_mirror_/meta": ("meta", lambda v: L.hessian_mirror_(torch.zeros(8, 8, device="meta"))),
    "gptq_solve/perm-not-permutation": ("value", lambda v: L.gptq_solve(v["w"], v["h"], torch.zeros(64, dtype=I64),
                                                                        v["s"], v["z"], v["col_group"], 4, 32, 0.01)),
    "gptq_solve/perm-out-of-range": ("value", lambda v: L.gptq_solve(v["w"], v["h"], torch.arange(64) + 1000, v["s"],
                                                                     v["z"], v["col_group"], 4, 32, 0.01)),
    "gptq_solve/perm-length": ("value", lambda v: L.gptq_solve(v["w"], v["h"], torch.arange(65), v["s"], v["z"],
                                                               v["col_group"], 4, 32, 0.01)),
    "gptq_solve/perm-2d": ("value", lambda v: L.gptq_solve(v["w"], v["h"], torch.arange(64).reshape(8, 8), v["s"],
                                                           v["z"], v["col_group"], 4, 32, 0.01)),
    "gptq_solve/perm-float": ("type", lambda v: L.gptq_solve(v["w"], v["h"], torch.arange(64.0), v["s"], v["z"],
                                                             v["col_group"], 4, 32, 0.01)),
    "gptq_solve/col-group-range": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"],
                                                                   v["col_group"] + 1, 4, 32, 0.01)),
    "gptq_solve/col-group-negative": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"],
                                                                      v["col_group"] - 1, 4, 32, 0.01)),
    "gptq_solve/col-group-length": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"],
                                                                    v["col_group"][:63], 4, 32, 0.01)),
    "gptq_solve/hessian-shape": ("value", lambda v: L.gptq_solve(v["w"], v["h"][:32, :32], v["perm"], v["s"], v["z"],
                                                                 v["col_group"], 4, 32, 0.01)),
    "gptq_solve/hessian-float64": ("type", lambda v: L.gptq_solve(v["w"], v["h"].double(), v["perm"], v["s"], v["z"],
                                                                  v["col_group"], 4, 32, 0.01)),
    "gptq_solve/scale-rows": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"][:5], v["z"][:5],
                                                              v["col_group"], 4, 32, 0.01)),
    "gptq_solve/zero-shape": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"][:, :1],
                                                              v["col_group"], 4, 32, 0.01)),
    # float32 zero points are GGUF grids' fractional offsets; other float dtypes are refused
    "gptq_solve/zero-half": ("type", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"].half(),
                                                             v["col_group"], 4, 32, 0.01)),
    "gptq_solve/block-0": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"], v["col_group"],
                                                           4, 0, 0.01)),
    "gptq_solve/damp-0": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"], v["col_group"],
                                                          4, 32, 0.0)),
    "gptq_solve/damp-nan": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"],
                                                            v["col_group"], 4, 32, math.nan)),
    "gptq_solve/bits-9": ("value", lambda v: L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"], v["col_group"],
                                                          9, 32, 0.01)),
    "gptq_solve/no-columns": ("value", lambda v: L.gptq_solve(torch.zeros(6, 0), torch.zeros(0, 0),
                                                              torch.zeros(0, dtype=I64), v["s"][:, :1], v["z"][:, :1],
                                                              torch.zeros(0, dtype=I64), 4, 32, 0.01)),
    "gptq_solve/noncontig": ("same", lambda v: (
        L.gptq_solve(_nc(v["w"]), _nc(v["h"]), _nc(v["perm"]), _nc(v["s"]), _nc(v["z"]), _nc(v["col_group"]), 4, 32,
                     0.01),
        L.gptq_solve(v["w"], v["h"], v["perm"], v["s"], v["z"], v["col_group"], 4, 32, 0.01))),
    "gptq_solve/meta": ("value", lambda v: L.gptq_solve(*_meta(v["w"], v["h"], v["perm"], v["s"], v["z"],
                                                                 v["col_group"]), 4, 32, 0.01)),
    "gptq_solve/mixed-meta": ("value", lambda v: L.gptq_solve(v["w"].to("meta"), v["h"], v["perm"], v["s"], v["z"],
                                                                v["col_group"], 4, 32, 0.01)),
    # ------------------------------------------------------------ AWQ
    "awq_channel_stats_/float32": ("type", lambda v: L.awq_channel_stats_(torch.zeros(64), v["xs"], 0)),
    "awq_channel_stats_/length": ("value", lambda v: L.awq_channel_stats_(torch.zeros(63, dtype=F64), v["xs"], 0)),
    "awq_channel_stats_/2d": ("value", lambda v: L.awq_channel_stats_(torch.zeros(1, 64, dtype=F64), v["xs"], 0)),
    "awq_channel_stats_/noncontig-acc": ("value", lambda v: L.awq_channel_stats_(torch.zeros(128, dtype=F64)[::2],
                                                                                 v["xs"], 0)),
    "awq_channel_stats_/inputs-empty": ("value", lambda v: L.awq_channel_stats_(torch.zeros(64, dtype=F64),
                                                                                v["xs"][:0], 0)),
    "awq_channel_stats_/inputs-int": ("type", lambda v: L.awq_channel_stats_(torch.zeros(64, dtype=F64), v["codes"],
                                                                             0)),
    "awq_channel_stats_/alias": ("value", lambda v: (lambda acc: L.awq_channel_stats_(
        acc, acc.view(F32).reshape(2, 64), 0))(torch.ones(64, dtype=F64))),
    "awq_channel_stats_/count-neg": ("value", lambda v: L.awq_channel_stats_(torch.zeros(64, dtype=F64), v["xs"], -1)),
    "awq_channel_stats_/noncontig-inputs": ("same", lambda v: (
        (lambda acc: (acc, L.awq_channel_stats_(acc, _nc(v["xs"]), 2)))(torch.zeros(64, dtype=F64)),
        (v["xs"].abs().double().sum(0), 42))),
    "awq_channel_stats_/mixed-meta": ("value", lambda v: L.awq_channel_stats_(torch.zeros(64, dtype=F64),
                                                                              v["xs"].to("meta"), 0)),
    "awq_gram_factor/1d": ("value", lambda v: L.awq_gram_factor(v["h"].reshape(-1))),
    "awq_gram_factor/nonsquare": ("value", lambda v: L.awq_gram_factor(v["h"][:32])),
    "awq_gram_factor/empty": ("value", lambda v: L.awq_gram_factor(torch.zeros(0, 0))),
    "awq_gram_factor/int": ("type", lambda v: L.awq_gram_factor(v["h"].int())),
    "awq_gram_factor/noncontig": ("same", lambda v: (L.awq_gram_factor(_nc(v["h"])), v["factor"])),
    "awq_gram_factor/meta": ("meta", lambda v: L.awq_gram_factor(v["h"].to("meta"))),
    "awq_scale_loss/factor-shape": ("value", lambda v: L.awq_scale_loss(v["w"], v["factor"][:32, :32], v["scales"], 4,
                                                                        32, False)),
    "awq_scale_loss/scales-length": ("value", lambda v: L.awq_scale_loss(v["w"], v["factor"], v["scales"][:32], 4, 32,
                                                                         False)),
    "awq_scale_loss/scales-int": ("type", lambda v: L.awq_scale_loss(v["w"], v["factor"], v["scales"].int(), 4, 32,
                                                                     False)),
    "awq_scale_loss/group-48": ("value", lambda v: L.awq_scale_loss(v["w"], v["factor"], v["scales"], 4, 48, False)),
    "awq_scale_loss/bits-9": ("value", lambda v: L.awq_scale_loss(v["w"], v["factor"], v["scales"], 9, 32, False)),
    "awq_scale_loss/weight-int": ("type", lambda v: L.awq_scale_loss(v["codes"], v["factor"], v["scales"], 4, 32,
                                                                     False)),
    "awq_scale_loss/noncontig": ("same", lambda v: (
        L.awq_scale_loss(_nc(v["w"]), _nc(v["factor"]), _nc(v["scales"]), 4, 32, False),
        L.awq_scale_loss(v["w"], v["factor"], v["scales"], 4, 32, False))),
    "awq_scale_loss/meta": ("value", lambda v: L.awq_scale_loss(*_meta(v["w"], v["factor"], v["scales"]), 4, 32,
                                                                  False)),
    "awq_scale_loss/mixed-meta": ("value", lambda v: L.awq_scale_loss(v["w"], v["factor"].to("meta"), v["scales"],
                                                                        4, 32, False)),
    "awq_clip/gram-shape": ("value", lambda v: L.awq_clip(v["w"], v["h"][:32, :32], 4, 32, False, 20, 0.5)),
    "awq_clip/gram-int": ("type", lambda v: L.awq_clip(v["w"], v["h"].int(), 4, 32, False, 20, 0.5)),
    "awq_clip/grid-0": ("value", lambda v: L.awq_clip(v["w"], v["h"], 4, 32, False, 0, 0.5)),
    "awq_clip/grid-huge": ("value", lambda v: L.awq_clip(v["w"], v["h"], 4, 32, False, 1 << 60, 0.5)),
    "awq_clip/shrink-1": ("value", lambda v: L.awq_clip(v["w"], v["h"], 4, 32, False, 20, 1.0)),
    "awq_clip/shrink-nan": ("value", lambda v: L.awq_clip(v["w"], v["h"], 4, 32, False, 20, math.nan)),
    "awq_clip/group-48": ("value", lambda v: L.awq_clip(v["w"], v["h"], 4, 48, False, 20, 0.5)),
    "awq_clip/noncontig": ("same", lambda v: (L.awq_clip(_nc(v["w"]), _nc(v["h"]), 4, 32, False, 20, 0.5),
                                              L.awq_clip(v["w"], v["h"], 4, 32, False, 20, 0.5))),
    "awq_clip/mixed-meta": ("value", lambda v: L.awq_clip(v["w"], v["h"].to("meta"), 4, 32, False, 20, 0.5)),
    "awq_clip/meta": ("meta", lambda v: L.awq_clip(*_meta(v["w"], v["h"]), 4, 32, False, 20, 0.5)),
    # ------------------------------------------------------------ NF4 / FP4 and 8-bit blockwise
    "nf4_quantize/blocksize-48": ("value", lambda v: L.nf4_quantize(v["w"], 48, "nf4")),
    "nf4_quantize/blocksize-16": ("value", lambda v: L.nf4_quantize(v["w"], 16, "nf4")),
    "nf4_quantize/blocksize-8192": ("value", lambda v: L.nf4_quantize(v["w"], 8192, "nf4")),
    "nf4_quantize/quant-type": ("value", lambda v: L.nf4_quantize(v["w"], 64, "int4")),
    "nf4_quantize/empty": ("value", lambda v: L.nf4_quantize(v["w"][:0], 64, "nf4")),
    "nf4_quantize/int": ("type", lambda v: L.nf4_quantize(v["codes"], 64, "nf4")),
    "nf4_quantize/noncontig": ("same", lambda v: (L.nf4_quantize(_nc(v["w"]), 32, "nf4"),
                                                  (v["nf4_packed"], v["nf4_absmax"]))),
    "nf4_quantize/meta": ("meta", lambda v: L.nf4_quantize(v["w"].to("meta"), 32, "nf4")),
    "nf4_dequantize/numel": ("value", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 390,
                                                                 F32)),
    "nf4_dequantize/numel-0": ("value", lambda v: L.nf4_dequantize(v["nf4_packed"][:0], v["nf4_absmax"][:0], 32,
                                                                   "nf4", 0, F32)),
    "nf4_dequantize/numel-huge": ("value", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"], 32, "nf4",
                                                                      (1 << 63) - 1, F32)),
    "nf4_dequantize/absmax-length": ("value", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"][:11], 32,
                                                                         "nf4", 384, F32)),
    "nf4_dequantize/absmax-int": ("type", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"].int(), 32,
                                                                     "nf4", 384, F32)),
    "nf4_dequantize/packed-int8": ("type", lambda v: L.nf4_dequantize(v["nf4_packed"].to(I8), v["nf4_absmax"], 32,
                                                                      "nf4", 384, F32)),
    "nf4_dequantize/dtype-int": ("type", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 384,
                                                                    I32)),
    "nf4_dequantize/blocksize": ("value", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"], 33, "nf4", 384,
                                                                     F32)),
    "nf4_dequantize/noncontig": ("same", lambda v: (
        L.nf4_dequantize(_nc(v["nf4_packed"]), _nc(v["nf4_absmax"]), 32, "nf4", 384, F32),
        L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 384, F32))),
    "nf4_dequantize/mixed-meta": ("value", lambda v: L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"].to("meta"), 32,
                                                                      "nf4", 384, F32)),
    "nf4_linear/k-mismatch": ("value", lambda v: L.nf4_linear(torch.randn(3, 128), v["nf4_packed"], v["nf4_absmax"],
                                                              32, "nf4", 6, None)),
    "nf4_linear/k-blocksize": ("value", lambda v: L.nf4_linear(torch.randn(3, 48), v["nf4_packed"], v["nf4_absmax"],
                                                               32, "nf4", 8, None)),
    "nf4_linear/out-features": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 32, "nf4",
                                                                7, None)),
    "nf4_linear/out-features-wrap": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 32,
                                                                     "nf4", (1 << 58) + 6, None)),
    "nf4_linear/out-features-neg": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 32,
                                                                    "nf4", -6, None)),
    "nf4_linear/absmax-length": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"][:11], 32,
                                                                 "nf4", 6, None)),
    "nf4_linear/absmax-int32": ("type", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"].int(), 32,
                                                               "nf4", 6, None)),
    "nf4_linear/packed-int8": ("type", lambda v: L.nf4_linear(v["x"], v["nf4_packed"].to(I8), v["nf4_absmax"], 32,
                                                              "nf4", 6, None)),
    "nf4_linear/bias-length": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 6,
                                                               v["bias"][:5])),
    "nf4_linear/x-0d": ("value", lambda v: L.nf4_linear(torch.tensor(1.0), v["nf4_packed"], v["nf4_absmax"], 32,
                                                        "nf4", 6, None)),
    "nf4_linear/quant-type": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 32, "int4",
                                                              6, None)),
    "nf4_linear/blocksize-0": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 0, "nf4", 6,
                                                               None)),
    "nf4_linear/uint8-absmax-alone": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32,
                                                                      "nf4", 6, None)),
    "nf4_linear/nested-length": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32, "nf4", 6,
                                                                 None, torch.ones(2), v["dyn"], v["offset"])),
    "nf4_linear/nested-code-255": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32, "nf4",
                                                                   6, None, v["dq_nested"], v["dyn"][:255],
                                                                   v["offset"])),
    "nf4_linear/nested-int": ("type", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32, "nf4", 6,
                                                             None, v["dq_nested"].int(), v["dyn"], v["offset"])),
    "nf4_linear/offset-2": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32, "nf4", 6,
                                                            None, v["dq_nested"], v["dyn"], torch.zeros(2))),
    "nf4_linear/offset-1d": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32, "nf4", 6,
                                                             None, v["dq_nested"], v["dyn"], torch.zeros(1))),
    "nf4_linear/nested-with-float-absmax": ("value", lambda v: L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"],
                                                                            32, "nf4", 6, None, v["dq_nested"],
                                                                            v["dyn"], v["offset"])),
    "nf4_linear/noncontig": ("same", lambda v: (
        L.nf4_linear(_nc(v["x"]), _nc(v["nf4_packed"]), _nc(v["nf4_absmax"]), 32, "nf4", 6, _nc(v["bias"])),
        L.nf4_linear(v["x"], v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 6, v["bias"]))),
    "nf4_linear/noncontig-many-tokens": ("same", lambda v: (
        L.nf4_linear(_nc(v["xs"]), v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 6, None),
        v["xs"] @ L.nf4_dequantize(v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 384, F32).reshape(6, 64).t())),
    "nf4_linear/double-quant-noncontig": ("same", lambda v: (
        L.nf4_linear(_nc(v["x"]), v["nf4_packed"], _nc(v["dq_codes"]), 32, "nf4", 6, None, _nc(v["dq_nested"]),
                     _nc(v["dyn"]), v["offset"]),
        L.nf4_linear(v["x"], v["nf4_packed"], v["dq_codes"], 32, "nf4", 6, None, v["dq_nested"], v["dyn"],
                     v["offset"]))),
    "nf4_linear/empty": ("same", lambda v: (L.nf4_linear(v["x"][:0], v["nf4_packed"], v["nf4_absmax"], 32, "nf4", 6,
                                                         None), torch.empty(0, 6))),
    "nf4_linear/mixed-meta-x-cpu": ("value", lambda v: L.nf4_linear(v["x"], *_meta(v["nf4_packed"], v["nf4_absmax"]),
                                                                    32, "nf4", 6, None)),
    "nf4_linear/mixed-meta-offset": ("value", lambda v: L.nf4_linear(
        *_meta(v["x"], v["nf4_packed"], v["dq_codes"]), 32, "nf4", 6, None, *_meta(v["dq_nested"], v["dyn"]),
        v["offset"])),
    "nf4_linear/meta": ("meta", lambda v: L.nf4_linear(*_meta(v["x"], v["nf4_packed"], v["nf4_absmax"]), 32, "nf4", 6,
                                                       None)),
    "nf4_linear/meta-double-quant": ("meta", lambda v: L.nf4_linear(
        *_meta(v["x"], v["nf4_packed"], v["dq_codes"]), 32, "nf4", 6, None,
        *_meta(v["dq_nested"], v["dyn"], v["offset"]))),
    "blockwise8_quantize/code-255": ("value", lambda v: L.blockwise8_quantize(v["nf4_absmax"], v["dyn"][:255], 256)),
    "blockwise8_quantize/code-2d": ("value", lambda v: L.blockwise8_quantize(v["nf4_absmax"], v["dyn"].reshape(16, 16),
                                                                             256)),
    "blockwise8_quantize/code-int": ("type", lambda v: L.blockwise8_quantize(v["nf4_absmax"], v["dyn"].int(), 256)),
    "blockwise8_quantize/blocksize-0": ("value", lambda v: L.blockwise8_quantize(v["nf4_absmax"], v["dyn"], 0)),
    "blockwise8_quantize/values-int": ("type", lambda v: L.blockwise8_quantize(v["codes"], v["dyn"], 256)),
    "blockwise8_quantize/blocksize-max": ("same", lambda v: (
        L.blockwise8_quantize(v["nf4_absmax"], v["dyn"], (1 << 63) - 1),
        L.blockwise8_quantize(v["nf4_absmax"], v["dyn"], 4096))),
    "blockwise8_quantize/empty": ("same", lambda v: (L.blockwise8_quantize(v["nf4_absmax"][:0], v["dyn"], 256),
                                                     (torch.empty(0, dtype=U8), torch.empty(0)))),
    "blockwise8_quantize/noncontig": ("same", lambda v: (L.blockwise8_quantize(_nc(v["w"]), _nc(v["dyn"]), 64),
                                                         L.blockwise8_quantize(v["w"], v["dyn"], 64))),
    "blockwise8_quantize/mixed-meta": ("value", lambda v: L.blockwise8_quantize(v["nf4_absmax"], v["dyn"].to("meta"),
                                                                                256)),
    "blockwise8_quantize/meta": ("meta", lambda v: L.blockwise8_quantize(*_meta(v["nf4_absmax"], v["dyn"]), 256)),
    "blockwise8_dequantize/absmax-length": ("value", lambda v: L.blockwise8_dequantize(v["dq_codes"], torch.ones(2),
                                                                                       v["dyn"], 256)),
    "blockwise8_dequantize/codes-int8": ("type", lambda v: L.blockwise8_dequantize(v["dq_codes"].to(I8),
                                                                                   v["dq_nested"], v["dyn"], 256)),
    "blockwise8_dequantize/code-255": ("value", lambda v: L.blockwise8_dequantize(v["dq_codes"], v["dq_nested"],
                                                                                  v["dyn"][:255], 256)),
    "blockwise8_dequantize/blocksize-0": ("value", lambda v: L.blockwise8_dequantize(v["dq_codes"], v["dq_nested"],
                                                                                     v["dyn"], 0)),
    "blockwise8_dequantize/noncontig": ("same", lambda v: (
        L.blockwise8_dequantize(_nc(v["dq_codes"]), _nc(v["dq_nested"]), _nc(v["dyn"]), 256),
        L.blockwise8_dequantize(v["dq_codes"], v["dq_nested"], v["dyn"], 256))),
    "blockwise8_dequantize/mixed-meta": ("value", lambda v: L.blockwise8_dequantize(v["dq_codes"].to("meta"),
                                                                                    v["dq_nested"], v["dyn"], 256)),
    # ------------------------------------------------------------ LLM.int8()
    "int8_quantize_rowwise/threshold-neg": ("value", lambda v: L.int8_quantize_rowwise(v["x"], -1.0)),
    "int8_quantize_rowwise/threshold-nan": ("value", lambda v: L.int8_quantize_rowwise(v["x"], math.nan)),
    "int8_quantize_rowwise/threshold-inf": ("value", lambda v: L.int8_quantize_rowwise(v["x"], math.inf)),
    "int8_quantize_rowwise/empty": ("value", lambda v: L.int8_quantize_rowwise(v["x"][:0], 6.0)),
    "int8_quantize_rowwise/0d": ("value", lambda v: L.int8_quantize_rowwise(torch.tensor(1.0), 6.0)),
    "int8_quantize_rowwise/int": ("type", lambda v: L.int8_quantize_rowwise(v["codes"], 6.0)),
    "int8_quantize_rowwise/noncontig": ("same", lambda v: (L.int8_quantize_rowwise(_nc(v["x"] * 3), 6.0),
                                                           ref_int8.quantize_rowwise(v["x"] * 3, 6.0))),
    # meta tensors cannot hold the data-dependent outlier count (FakeTensors can)
    "int8_quantize_rowwise/meta": ("value", lambda v: L.int8_quantize_rowwise(v["x"].to("meta"), 6.0)),
    "int8_matmul/huge-k-mismatch": ("value", lambda v: L.int8_matmul(torch.ones(1, 1 << 26, dtype=I8),
                                                                     torch.ones(1, 1, dtype=I8))),
    "int8_matmul/k-mismatch": ("value", lambda v: L.int8_matmul(v["a"], v["b"][:, :32])),
    "int8_matmul/k-too-large": ("value", lambda v: L.int8_matmul(torch.ones(1, 65537, dtype=I8),
                                                                 torch.ones(1, 65537, dtype=I8))),
    "int8_matmul/a-int32": ("type", lambda v: L.int8_matmul(v["a"].int(), v["b"])),
    "int8_matmul/b-uint8": ("type", lambda v: L.int8_matmul(v["a"], v["b"].to(U8))),
    "int8_matmul/a-1d": ("value", lambda v: L.int8_matmul(v["a"][0], v["b"])),
    "int8_matmul/b-3d": ("value", lambda v: L.int8_matmul(v["a"], v["b"].reshape(5, 1, 64))),
    "int8_matmul/noncontig-b": ("same", lambda v: (L.int8_matmul(v["a"], _nc(v["b"])),
                                                   v["a"].int() @ v["b"].int().t())),
    "int8_matmul/noncontig-a": ("same", lambda v: (L.int8_matmul(_nc(v["a"]), v["b"]),
                                                   v["a"].int() @ v["b"].int().t())),
    "int8_matmul/noncontig-many-tokens": ("same", lambda v: (
        L.int8_matmul(_nc(v["b"].repeat(4, 1)), _nc(v["b"].repeat(2, 1)[:8])),
        v["b"].repeat(4, 1).int() @ v["b"].repeat(2, 1)[:8].int().t())),
    "int8_matmul/empty-m": ("same", lambda v: (L.int8_matmul(v["a"][:0], v["b"]), torch.empty(0, 5, dtype=I32))),
    "int8_matmul/empty-k": ("same", lambda v: (L.int8_matmul(torch.ones(16, 0, dtype=I8), torch.ones(8, 0, dtype=I8)),
                                               torch.zeros(16, 8, dtype=I32))),
    "int8_matmul/mixed-meta": ("value", lambda v: L.int8_matmul(v["a"], v["b"].to("meta"))),
    "int8_matmul/meta": ("meta", lambda v: L.int8_matmul(*_meta(v["a"], v["b"]))),
    "int8_outlier_matmul/k-mismatch": ("value", lambda v: L.int8_outlier_matmul(torch.randn(3, 32), v["wq"], v["scb"],
                                                                                6.0, None)),
    "int8_outlier_matmul/scale-length": ("value", lambda v: L.int8_outlier_matmul(v["x"], v["wq"], v["scb"][:5], 6.0,
                                                                                  None)),
    "int8_outlier_matmul/scale-int": ("type", lambda v: L.int8_outlier_matmul(v["x"], v["wq"], v["scb"].int(), 6.0,
                                                                              None)),
    "int8_outlier_matmul/w-float": ("type", lambda v: L.int8_outlier_matmul(v["x"], v["wq"].float(), v["scb"], 6.0,
                                                                            None)),
    "int8_outlier_matmul/x-int": ("type", lambda v: L.int8_outlier_matmul(v["codes"], v["wq"], v["scb"], 6.0, None)),
    "int8_outlier_matmul/threshold-neg": ("value", lambda v: L.int8_outlier_matmul(v["x"], v["wq"], v["scb"], -1.0,
                                                                                   None)),
    "int8_outlier_matmul/threshold-nan": ("value", lambda v: L.int8_outlier_matmul(v["x"], v["wq"], v["scb"],
                                                                                   math.nan, None)),
    "int8_outlier_matmul/bias-length": ("value", lambda v: L.int8_outlier_matmul(v["x"], v["wq"], v["scb"], 6.0,
                                                                                 v["bias"][:5])),
    "int8_outlier_matmul/k-0": ("value", lambda v: L.int8_outlier_matmul(torch.randn(3, 0), torch.zeros(6, 0, dtype=I8),
                                                                         v["scb"], 6.0, None)),
    "int8_outlier_matmul/noncontig": ("same", lambda v: (
        L.int8_outlier_matmul(_nc(v["x"] * 3), _nc(v["wq"]), _nc(v["scb"]), 6.0, _nc(v["bias"])),
        ref_int8.outlier_matmul(v["x"] * 3, v["wq"], v["scb"], 6.0, v["bias"]))),
    "int8_outlier_matmul/empty": ("same", lambda v: (L.int8_outlier_matmul(v["x"][:0], v["wq"], v["scb"], 6.0, None),
                                                     torch.empty(0, 6))),
    "int8_outlier_matmul/mixed-meta": ("value", lambda v: L.int8_outlier_matmul(v["x"], v["wq"].to("meta"), v["scb"],
                                                                                6.0, None)),
    "int8_outlier_matmul/meta": ("meta", lambda v: L.int8_outlier_matmul(*_meta(v["x"], v["wq"], v["scb"]), 6.0,
                                                                         None)),
    "int8_dynamic_linear/k-mismatch": ("value", lambda v: L.int8_dynamic_linear(torch.randn(3, 32), v["wq"],
                                                                                v["scb"], None, None)),
    "int8_dynamic_linear/scale-length": ("value", lambda v: L.int8_dynamic_linear(v["x"], v["wq"], v["scb"][:5],
                                                                                  None, None)),
    "int8_dynamic_linear/scale-int": ("type", lambda v: L.int8_dynamic_linear(v["x"], v["wq"], v["scb"].int(), None,
                                                                              None)),
    "int8_dynamic_linear/w-float": ("type", lambda v: L.int8_dynamic_linear(v["x"], v["wq"].float(), v["scb"], None,
                                                                            None)),
    "int8_dynamic_linear/x-int": ("type", lambda v: L.int8_dynamic_linear(v["codes"], v["wq"], v["scb"], None, None)),
    "int8_dynamic_linear/x-nan": ("value", lambda v: L.int8_dynamic_linear(v["x"] * math.nan, v["wq"], v["scb"], None,
                                                                           None)),
    "int8_dynamic_linear/input-scale-two": ("value", lambda v: L.int8_dynamic_linear(v["x"], v["wq"], v["scb"],
                                                                                     torch.ones(2), None)),
    "int8_dynamic_linear/input-scale-0": ("value", lambda v: L.int8_dynamic_linear(v["x"], v["wq"], v["scb"],
                                                                                   torch.zeros(1), None)),
    "int8_dynamic_linear/input-scale-int": ("type", lambda v: L.int8_dynamic_linear(v["x"], v["wq"], v["scb"],
                                                                                    torch.ones(1, dtype=I8), None)),
    "int8_dynamic_linear/bias-length": ("value", lambda v: L.int8_dynamic_linear(v["x"], v["wq"], v["scb"], None,
                                                                                 v["bias"][:5])),
    "int8_dynamic_linear/k-0": ("value", lambda v: L.int8_dynamic_linear(torch.randn(3, 0), torch.zeros(6, 0, dtype=I8),
                                                                         v["scb"], None, None)),
    "int8_dynamic_linear/noncontig": ("same", lambda v: (  # against lowbit.reference in test_int8.py
        L.int8_dynamic_linear(_nc(v["x"] * 3), _nc(v["wq"]), _nc(v["scb"]), None, _nc(v["bias"])),
        L.int8_dynamic_linear(v["x"] * 3, v["wq"], v["scb"], None, v["bias"]))),
    "int8_dynamic_linear/empty": ("same", lambda v: (L.int8_dynamic_linear(v["x"][:0], v["wq"], v["scb"], None, None),
                                                     torch.empty(0, 6))),
    "int8_dynamic_linear/mixed-meta": ("value", lambda v: L.int8_dynamic_linear(v["x"], v["wq"].to("meta"), v["scb"],
                                                                                None, None)),
    "int8_dynamic_linear/meta": ("meta", lambda v: L.int8_dynamic_linear(*_meta(v["x"], v["wq"], v["scb"]), None,
                                                                         None)),
    # ------------------------------------------------------------ FP8
    "fp8_scales/format": ("value", lambda v: L.fp8_scales(v["w"], 1, 64, "e3m4")),
    "fp8_scales/block-0": ("value", lambda v: L.fp8_scales(v["w"], 0, 64)),
    "fp8_scales/block-neg": ("value", lambda v: L.fp8_scales(v["w"], 1, -64)),
    "fp8_scales/int": ("type", lambda v: L.fp8_scales(v["codes"], 1, 64)),
    "fp8_scales/float64": ("type", lambda v: L.fp8_scales(v["w"].double(), 1, 64)),
    "fp8_scales/1d": ("value", lambda v: L.fp8_scales(v["w"].reshape(-1), 1, 64)),
    "fp8_scales/nan": ("value", lambda v: L.fp8_scales(v["w"].index_fill(1, torch.tensor([3]), math.nan), 1, 64)),
    "fp8_scales/inf": ("value", lambda v: L.fp8_scales(v["w"].index_fill(1, torch.tensor([3]), math.inf), 1, 64)),
    "fp8_scales/block-huge": ("same", lambda v: (L.fp8_scales(v["w"], BIG, BIG), L.fp8_scales(v["w"], 6, 64))),
    "fp8_scales/noncontig": ("same", lambda v: (L.fp8_scales(_nc(v["w"]), 1, 64), v["fs"])),
    "fp8_scales/empty": ("same", lambda v: (L.fp8_scales(v["w"][:0], 1, 64), torch.empty(0, 1))),
    "fp8_scales/meta": ("meta", lambda v: L.fp8_scales(v["w"].to("meta"), 1, 64)),
    "fp8_quantize/format": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"], 1, 64, "fp8")),
    "fp8_quantize/block-0": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"], 1, 0)),
    "fp8_quantize/scale-shape": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"][:5], 1, 64)),
    "fp8_quantize/scale-transposed": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"].t(), 1, 64)),
    "fp8_quantize/scale-flat": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"].reshape(-1), 1, 64)),
    "fp8_quantize/scale-int": ("type", lambda v: L.fp8_quantize(v["w"], v["fs"].int(), 1, 64)),
    "fp8_quantize/scale-zero": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"] * 0, 1, 64)),
    "fp8_quantize/scale-nan": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"] * math.nan, 1, 64)),
    "fp8_quantize/scale-inf": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"] * math.inf, 1, 64)),
    "fp8_quantize/x-int": ("type", lambda v: L.fp8_quantize(v["codes"], v["fs"], 1, 64)),
    "fp8_quantize/x-3d": ("value", lambda v: L.fp8_quantize(v["w"].reshape(2, 3, 64), v["fs"], 1, 64)),
    "fp8_quantize/x-nan": ("value", lambda v: L.fp8_quantize(v["w"] * math.nan, v["fs"], 1, 64)),
    "fp8_quantize/noncontig": ("same", lambda v: (L.fp8_quantize(_nc(v["w"]), _nc(v["fs"]), 1, 64).float(),
                                                  torch.clamp(v["w"] / v["fs"], -448, 448).to(torch.float8_e4m3fn)
                                                  .float())),
    "fp8_quantize/e5m2": ("same", lambda v: (L.fp8_quantize(v["w"], v["fs"], 1, 64, "e5m2").float(),
                                             v["w"].div(v["fs"]).to(torch.float8_e5m2).float())),
    "fp8_quantize/empty": ("same", lambda v: (L.fp8_quantize(v["w"][:, :0], v["fs"][:, :0], 1, 64).float(),
                                              torch.empty(6, 0))),
    "fp8_quantize/mixed-meta": ("value", lambda v: L.fp8_quantize(v["w"], v["fs"].to("meta"), 1, 64)),
    "fp8_quantize/meta": ("meta", lambda v: L.fp8_quantize(*_meta(v["w"], v["fs"]), 1, 64)),
    "fp8_dequantize/q-uint8": ("type", lambda v: L.fp8_dequantize(v["fq"].view(U8), v["fs"], 1, 64, F32)),
    "fp8_dequantize/q-float": ("type", lambda v: L.fp8_dequantize(v["w"], v["fs"], 1, 64, F32)),
    "fp8_dequantize/dtype-int": ("type", lambda v: L.fp8_dequantize(v["fq"], v["fs"], 1, 64, I32)),
    "fp8_dequantize/dtype-float64": ("type", lambda v: L.fp8_dequantize(v["fq"], v["fs"], 1, 64, F64)),
    "fp8_dequantize/scale-shape": ("value", lambda v: L.fp8_dequantize(v["fq"], v["fs"], 2, 64, F32)),
    "fp8_dequantize/scale-neg": ("value", lambda v: L.fp8_dequantize(v["fq"], -v["fs"], 1, 64, F32)),
    "fp8_dequantize/q-1d": ("value", lambda v: L.fp8_dequantize(v["fq"].reshape(-1), v["fs"], 1, 64, F32)),
    "fp8_dequantize/noncontig": ("same", lambda v: (L.fp8_dequantize(_nc(v["fq"]), _nc(v["fs"]), 1, 64, F32),
                                                    v["fq"].float() * v["fs"])),
    "fp8_dequantize/mixed-meta": ("value", lambda v: L.fp8_dequantize(v["fq"].to("meta"), v["fs"], 1, 64, F32)),
    "fp8_dequantize/meta": ("meta", lambda v: L.fp8_dequantize(*_meta(v["fq"], v["fs"]), 1, 64, BF16)),
    "fp8_fake_quantize/scale-shape": ("value", lambda v: L.fp8_fake_quantize(v["w"], v["fs"], 6, 64)),
    "fp8_fake_quantize/format": ("value", lambda v: L.fp8_fake_quantize(v["w"], v["fs"], 1, 64, "")),
    "fp8_fake_quantize/x-nan": ("value", lambda v: L.fp8_fake_quantize(v["w"] * math.nan, v["fs"], 1, 64)),
    "fp8_fake_quantize/x-float64": ("type", lambda v: L.fp8_fake_quantize(v["w"].double(), v["fs"], 1, 64)),
    "fp8_fake_quantize/noncontig": ("same", lambda v: (L.fp8_fake_quantize(_nc(v["w"]), _nc(v["fs"]), 1, 64),
                                                       v["fq"].float() * v["fs"])),
    "fp8_fake_quantize/mixed-meta": ("value", lambda v: L.fp8_fake_quantize(v["w"].to("meta"), v["fs"], 1, 64)),
    "fp8_fake_quantize/meta": ("meta", lambda v: L.fp8_fake_quantize(*_meta(v["w"], v["fs"]), 1, 64)),
    "fp8_linear/k-mismatch": ("value", lambda v: L.fp8_linear(torch.randn(3, 32), v["fq"], v["fs"], 1, 64, None)),
    "fp8_linear/weight-float": ("type", lambda v: L.fp8_linear(v["x"], v["w"], v["fs"], 1, 64, None)),
    "fp8_linear/weight-int8": ("type", lambda v: L.fp8_linear(v["x"], v["codes"], v["fs"], 1, 64, None)),
    "fp8_linear/weight-1d": ("value", lambda v: L.fp8_linear(v["x"], v["fq"].reshape(-1), v["fs"], 1, 64, None)),
    "fp8_linear/scale-shape": ("value", lambda v: L.fp8_linear(v["x"], v["fq"], v["fs"][:1], 1, 64, None)),
    "fp8_linear/scale-int": ("type", lambda v: L.fp8_linear(v["x"], v["fq"], v["fs"].int(), 1, 64, None)),
    "fp8_linear/scale-zero": ("value", lambda v: L.fp8_linear(v["x"], v["fq"], v["fs"] * 0, 1, 64, None)),
    "fp8_linear/block-0": ("value", lambda v: L.fp8_linear(v["x"], v["fq"], v["fs"], 0, 64, None)),
    "fp8_linear/bias-5": ("value", lambda v: L.fp8_linear(v["x"], v["fq"], v["fs"], 1, 64, v["bias"][:5])),
    "fp8_linear/bias-int": ("type", lambda v: L.fp8_linear(v["x"], v["fq"], v["fs"], 1, 64, v["bias"].int())),
    "fp8_linear/x-int": ("type", lambda v: L.fp8_linear(v["codes"], v["fq"], v["fs"], 1, 64, None)),
    "fp8_linear/x-0d": ("value", lambda v: L.fp8_linear(torch.tensor(1.0), v["fq"], v["fs"], 1, 64, None)),
    "fp8_linear/noncontig": ("same", lambda v: (
        L.fp8_linear(_nc(v["x"]), _nc(v["fq"]), _nc(v["fs"]), 1, 64, _nc(v["bias"])),
        torch.nn.functional.linear(v["x"], v["fq"].float() * v["fs"], v["bias"]))),
    "fp8_linear/3d-many-tokens": ("same", lambda v: (
        L.fp8_linear(v["xs"].reshape(4, 10, 64), v["fq"], v["fs"], 1, 64, None),
        torch.nn.functional.linear(v["xs"], v["fq"].float() * v["fs"]).reshape(4, 10, 6))),
    "fp8_linear/empty": ("same", lambda v: (L.fp8_linear(v["x"][:0], v["fq"], v["fs"], 1, 64, None),
                                            torch.empty(0, 6))),
    "fp8_linear/mixed-meta": ("value", lambda v: L.fp8_linear(v["x"], v["fq"].to("meta"), v["fs"], 1, 64, None)),
    "fp8_linear/mixed-meta-bias": ("value", lambda v: L.fp8_linear(*_meta(v["x"], v["fq"], v["fs"]), 1, 64,
                                                                   v["bias"])),
    "fp8_linear/meta": ("meta", lambda v: L.fp8_linear(*_meta(v["x"], v["fq"], v["fs"]), 1, 64, None)),
    # ------------------------------------------------------------ SmoothQuant
    "channel_range_/float64": ("type", lambda v: L.channel_range_(torch.zeros(64, dtype=F64), torch.zeros(64),
                                                                  v["xs"])),
    "channel_range_/length": ("value", lambda v: L.channel_range_(torch.zeros(63), torch.zeros(63), v["xs"])),
    "channel_range_/2d": ("value", lambda v: L.channel_range_(torch.zeros(1, 64), torch.zeros(64), v["xs"])),
    "channel_range_/noncontig-acc": ("value", lambda v: L.channel_range_(torch.zeros(128)[::2], torch.zeros(64),
                                                                         v["xs"])),
    "channel_range_/x-int": ("type", lambda v: L.channel_range_(torch.zeros(64), torch.zeros(64), v["codes"])),
    "channel_range_/x-0d": ("value", lambda v: L.channel_range_(torch.zeros(1), torch.zeros(1), torch.tensor(1.0))),
    "channel_range_/alias": ("value", lambda v: (lambda t: L.channel_range_(t, t, v["xs"]))(torch.zeros(64))),
    "channel_range_/alias-x": ("value", lambda v: (lambda t: L.channel_range_(t[0], torch.zeros(64), t))(
        torch.randn(5, 64))),
    "channel_range_/nan": ("value", lambda v: L.channel_range_(torch.zeros(64), torch.zeros(64),
                                                               v["xs"] * math.nan)),
    "channel_range_/noncontig-x": ("same", lambda v: (
        (lambda lo, hi: (L.channel_range_(lo, hi, _nc(v["xs"])), lo, hi)[1:])(torch.full((64,), math.inf),
                                                                              torch.full((64,), -math.inf)),
        (v["xs"].amin(0), v["xs"].amax(0)))),
    "channel_range_/empty": ("same", lambda v: ((lambda lo: (L.channel_range_(lo, lo + 1, v["xs"][:0]), lo)[1])(
        torch.zeros(64)), torch.zeros(64))),
    "channel_range_/mixed-meta": ("value", lambda v: L.channel_range_(torch.zeros(64), torch.zeros(64),
                                                                      v["xs"].to("meta"))),
    "channel_range_/meta": ("meta", lambda v: L.channel_range_(*_meta(torch.zeros(64), torch.zeros(64), v["xs"]))),
    # ------------------------------------------------------------ GGUF (blocks gb: Q4_0, 2 blocks of 18 bytes per row)
    "gguf_quantize/type": ("value", lambda v: L.gguf_quantize(v["w"], "Q4_2")),
    "gguf_quantize/cols": ("value", lambda v: L.gguf_quantize(v["w"], "Q4_K")),
    "gguf_quantize/w-int": ("type", lambda v: L.gguf_quantize(v["codes"], "Q4_0")),
    "gguf_quantize/w-float64": ("type", lambda v: L.gguf_quantize(v["w"].double(), "Q4_0")),
    "gguf_quantize/w-1d": ("value", lambda v: L.gguf_quantize(v["w"].reshape(-1), "Q4_0")),
    "gguf_quantize/w-nan": ("value", lambda v: L.gguf_quantize(v["w"] * math.nan, "Q4_K")),
    "gguf_quantize/importance-shape": ("value", lambda v: L.gguf_quantize(v["w"], "Q4_1", torch.ones(63))),
    "gguf_quantize/importance-dtype": ("type", lambda v: L.gguf_quantize(v["w"], "Q4_1", torch.ones(64, dtype=F64))),
    "gguf_quantize/importance-nan": ("value", lambda v: L.gguf_quantize(v["w"], "Q4_1", torch.full((64,), math.nan))),
    "gguf_quantize/type-int": ("dispatch", lambda v: L.gguf_quantize(v["w"], 4)),
    "gguf_quantize/noncontig": ("same", lambda v: (L.gguf_quantize(_nc(v["w"]), "Q4_1", _nc(torch.ones(64))),
                                                   L.gguf_quantize(v["w"], "Q4_1", torch.ones(64)))),
    "gguf_quantize/empty": ("same", lambda v: (L.gguf_quantize(v["w"][:0], "q8_0"), torch.empty(0, 68, dtype=U8))),
    "gguf_quantize/mixed-meta": ("value", lambda v: L.gguf_quantize(v["w"], "Q4_1", torch.ones(64, device="meta"))),
    "gguf_quantize/meta": ("meta", lambda v: (lambda w, i: L.gguf_quantize(w, "Q4_1", i))(
        *_meta(v["w"], torch.ones(64)))),
    "gguf_dequantize/row-bytes": ("value", lambda v: L.gguf_dequantize(v["gb"][:, :35], "Q4_0", 64, F32)),
    "gguf_dequantize/cols": ("value", lambda v: L.gguf_dequantize(v["gb"], "Q4_0", 96, F32)),
    "gguf_dequantize/cols-0": ("value", lambda v: L.gguf_dequantize(v["gb"][:, :0], "Q4_0", 0, F32)),
    "gguf_dequantize/cols-negative": ("value", lambda v: L.gguf_dequantize(v["gb"], "Q4_0", -64, F32)),
    "gguf_dequantize/blocks-int8": ("type", lambda v: L.gguf_dequantize(v["gb"].view(I8), "Q4_0", 64, F32)),
    "gguf_dequantize/dtype-int": ("type", lambda v: L.gguf_dequantize(v["gb"], "Q4_0", 64, I32)),
    "gguf_dequantize/blocks-1d": ("value", lambda v: L.gguf_dequantize(v["gb"].reshape(-1), "Q4_0", 64, F32)),
    "gguf_dequantize/noncontig": ("same", lambda v: (L.gguf_dequantize(_nc(v["gb"]), "Q4_0", 64, F32),
                                                     L.gguf_dequantize(v["gb"], "Q4_0", 64, F32))),
    "gguf_dequantize/empty": ("same", lambda v: (L.gguf_dequantize(v["gb"][:0], "Q4_0", 64, BF16),
                                                 torch.empty(0, 64, dtype=BF16))),
    "gguf_dequantize/meta": ("meta", lambda v: L.gguf_dequantize(v["gb"].to("meta"), "Q4_0", 64, F16)),
    "gguf_grid/type": ("value", lambda v: L.gguf_grid(v["gb"], "Q4_K", 64)),
    "gguf_grid/row-bytes": ("value", lambda v: L.gguf_grid(v["gb"], "Q5_0", 64)),
    "gguf_grid/blocks-3d": ("value", lambda v: L.gguf_grid(v["gb"].reshape(2, 3, 36), "Q4_0", 64)),
    "gguf_grid/noncontig": ("same", lambda v: (L.gguf_grid(_nc(v["gb"]), "Q4_0", 64),
                                               L.gguf_grid(v["gb"], "Q4_0", 64))),
    "gguf_grid/meta": ("meta", lambda v: L.gguf_grid(v["gb"].to("meta"), "Q4_0", 64)),
    "gguf_encode/out-of-range": ("value", lambda v: L.gguf_encode(v["gc"] + 16, v["gb"], "Q4_0")),
    "gguf_encode/codes-int64": ("type", lambda v: L.gguf_encode(v["gc"].long(), v["gb"], "Q4_0")),
    "gguf_encode/rows": ("value", lambda v: L.gguf_encode(v["gc"][:5], v["gb"], "Q4_0")),
    "gguf_encode/blocks-bytes": ("value", lambda v: L.gguf_encode(v["gc"], v["gb"][:, :18], "Q4_0")),
    "gguf_encode/type": ("value", lambda v: L.gguf_encode(v["gc"], v["gb"], "Q8_0")),
    "gguf_encode/noncontig": ("same", lambda v: (L.gguf_encode(_nc(v["gc"]), _nc(v["gb"]), "Q4_0"),
                                                 L.gguf_encode(v["gc"], v["gb"], "Q4_0"))),
    "gguf_encode/identity": ("same", lambda v: (L.gguf_encode(v["gc"], L.gguf_encode(v["gc"], v["gb"], "Q4_0"), "Q4_0"),
                                                L.gguf_encode(v["gc"], v["gb"], "Q4_0"))),
    "gguf_encode/mixed-meta": ("value", lambda v: L.gguf_encode(v["gc"].to("meta"), v["gb"], "Q4_0")),
    "gguf_encode/meta": ("meta", lambda v: L.gguf_encode(*_meta(v["gc"], v["gb"]), "Q4_0")),
}

EXPECTED = {
    "value": ("ValueError",),
    "type": ("TypeError",),
    "error": ("ValueError", "TypeError"),
    "dispatch": ("ValueError", "TypeError", "RuntimeError"),
}


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [y for item in x for y in _flat(item)]
    return [x]


def _compare(got, want):
    """None if got matches want (tensors: dtype, shape and values; numbers: to 1e-5), else why not."""
    got, want = _flat(got), _flat(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor) or g.dtype != w.dtype or g.shape != w.shape:
                return f"output {i}: {getattr(g, 'dtype', type(g))} {tuple(getattr(g, 'shape', ()))}, expected " \
                       f"{w.dtype} {tuple(w.shape)}"
            ok = (torch.equal(g, w) if not w.dtype.is_floating_point
                  else torch.allclose(g.float(), w.float(), rtol=1e-5, atol=1e-5, equal_nan=True))
            if not ok:
                return f"output {i}: values differ (max |diff| {(g.double() - w.double()).abs().max().item()})"
        elif not math.isclose(float(g), float(w), rel_tol=1e-5, abs_tol=1e-6):
            return f"output {i}: {g} != {w}"
    return None


def _run_case(name):
    global V
    if V is None:
        V = _valid()
    kind, fn = CASES[name]
    try:
        out = fn(V)
    except Exception as e:  # noqa: BLE001 - the type is the result
        return {"raised": type(e).__name__, "msg": str(e).splitlines()[0][:300] if str(e) else ""}
    if kind == "same":
        return {"returned": True, "mismatch": _compare(*out)}
    if kind == "meta":
        devices = sorted({t.device.type for t in _flat(out) if isinstance(t, torch.Tensor)})
        return {"returned": True, "mismatch": None if devices in (["meta"], []) else f"outputs on {devices}"}
    return {"returned": True}


def _child(names):
    torch.set_num_threads(2)
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        print(json.dumps({"case": name, **_run_case(name)}), flush=True)


def run_cases(names, timeout=60.0):
    """Runs the cases in child processes; a crash or hang fails the case it happened in and a
    new child takes the rest. -> {name: result dict}."""
    results, remaining = {}, list(names)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_raw_ops_child', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._child(sys.argv[2:])")
    while remaining:
        env = dict(os.environ, PYTHONWARNINGS="ignore", **{
            _CHILD_ENV: os.pathsep.join([lowbit._C.__file__, os.path.dirname(lowbit_ops.__file__)])})
        try:
            proc = subprocess.run([sys.executable, "-c", code, __file__, *remaining], capture_output=True, text=True,
                                  timeout=timeout, env=env)
            stdout, why = proc.stdout, f"crashed (exit status {proc.returncode}; its stderr is in the captured output)"
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            why = f"hung (no result within {timeout} s)"
        started = None
        for line in stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["case"]] = rec
                started = None
        if started is not None:
            results[started] = {"crash": why}
            if isinstance(why, str) and why.startswith("crashed"):
                sys.stderr.write(f"--- {started}: child stderr\n{proc.stderr}\n")  # sanitizer reports, if any
        elif not any(n in results for n in remaining):
            for n in remaining:  # the child died before running anything
                results[n] = {"crash": why}
        remaining = [n for n in remaining if n not in results]
    return results


@pytest.fixture(scope="module")
def results():
    return run_cases(list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_raw_op_call(results, name):
    kind, _ = CASES[name]
    r = results[name]
    assert "crash" not in r, f"{name}: the process {r['crash']}"
    if kind in EXPECTED:
        assert r.get("raised") in EXPECTED[kind], (
            f"{name}: expected {' or '.join(EXPECTED[kind])}, got "
            + (f"{r['raised']}: {r['msg']}" if "raised" in r else "a result"))
    else:
        assert "raised" not in r, f"{name}: raised {r['raised']}: {r['msg']}"
        assert r["mismatch"] is None, f"{name}: {r['mismatch']}"


def _op_names():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lowbit::"))


def _has_fake(name):
    entry = torch._library.simple_registry.singleton.find(f"lowbit::{name}")
    return entry.fake_impl.kernel is not None


def test_every_op_has_a_fake_kernel_or_a_reason():
    names = _op_names()
    assert len(names) >= 20, names
    missing = [n for n in names if not _has_fake(n) and n not in lowbit_ops.NO_FAKE]
    assert not missing, f"ops without a fake kernel (register one in lowbit/ops.py, or list in NO_FAKE why not): {missing}"
    stale = [n for n in lowbit_ops.NO_FAKE if n not in names or _has_fake(n)]
    assert not stale, f"NO_FAKE lists ops that are gone or have a fake kernel: {stale}"


def test_every_op_has_cases():
    """Each op has bad-argument cases, and each with a fake kernel a mixed meta / CPU case."""
    for name in _op_names():
        cases = [c for c in CASES if c.split("/")[0] == name]
        assert any(CASES[c][0] in EXPECTED for c in cases), f"{name}: no bad-argument case"
        if name not in ("quant_params", "pack", "unpack", "hessian_mirror_", "awq_gram_factor", "nf4_quantize",
                        "int8_quantize_rowwise", "fp8_scales", "gguf_dequantize", "gguf_grid"):  # a single tensor
            assert any("mixed-meta" in c for c in cases), f"{name}: no mixed meta / CPU case"


def test_nf4_linear_module_on_meta_raises():
    """The issue's example: a module moved to meta, called with a CPU input, must raise (at the
    module or at the op), not return uninitialised memory."""
    m = lowbit.nn.NF4Linear.from_linear(torch.nn.Linear(64, 8)).to("meta")
    with pytest.raises(ValueError):
        m(torch.randn(2, 64))


def test_fakes_accept_symbolic_shapes():
    """The fake kernels' shape checks work on FakeTensors with dynamic shapes (torch.compile)."""
    lin = torch.nn.Linear(64, 8)
    m = lowbit.nn.NF4Linear.from_linear(lin, double_quant=True)
    compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 64)
        assert torch.equal(compiled(x), m(x))
