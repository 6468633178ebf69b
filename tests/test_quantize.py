"""Quantization parameters, quantize, dequantize and fake-quantize against lowbit.reference.

The C++ kernels compute in fp32 exactly as the reference does, so with the min-max observer
codes, scales and zero points must be bit-identical. The MSE observer's search may pick a
different candidate only where two candidates' errors tie to within summation-order noise.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import functional as F
from lowbit import ops
from lowbit import reference as R

from conftest import (FLOAT_DTYPES, dtype_id, noncontig, per_row, qrange,
                      rand_weight, reference_params)

# Every kernel test runs on each ISA path this CPU supports (AVX-512, AVX2, portable).
pytestmark = pytest.mark.usefixtures("isa_path")

BITS = list(range(2, 9))

# (rows, cols, strategy, group_size): odd row counts, group sizes 7 / 32 / 128 where they divide.
LAYOUTS = [
    (17, 7, "group", 7),
    (3, 259, "group", 7),
    (17, 128, "group", 32),
    (3, 256, "group", 128),
    (17, 1, "channel", None),
    (3, 7, "channel", None),
    (17, 129, "channel", None),
    (3, 1, "tensor", None),
    (17, 7, "tensor", None),
    (3, 129, "tensor", None),
]
BIG_LAYOUTS = [
    (3, 4097, "channel", None),
    (3, 4097, "tensor", None),
    (5, 4096, "group", 128),
    (33, 4096, "group", 32),  # 4224 groups: enough work for the kernels' parallel loops
]


def layout_id(layout) -> str:
    rows, cols, strategy, gs = layout
    return f"{rows}x{cols}-{strategy}{gs or ''}"


def expected_param_shape(rows, cols, strategy, gs):
    return {"group": (rows, cols // (gs or 1)), "channel": (rows, 1), "tensor": (1,)}[strategy]


def per_column(t: torch.Tensor, gs: int) -> torch.Tensor:
    return t.float().repeat_interleave(gs, dim=1)


def check_minmax(w: torch.Tensor, bits: int, symmetric: bool, strategy: str, group_size,
                 check_bound: bool = True):
    """Everything lowbit computes for `w` must equal the reference bit for bit."""
    rows, cols = w.shape
    lo, hi = qrange(bits)
    rs, rz, rs2d, rz2d, gs = reference_params(w, bits, symmetric, strategy, group_size)

    # quant_params
    s, z = F.quant_params(w, bits, symmetric, strategy, group_size)
    assert tuple(s.shape) == expected_param_shape(rows, cols, strategy, group_size)
    assert s.dtype == w.dtype and z.dtype == torch.int8
    assert torch.equal(s, rs), "scales differ from the reference"
    assert torch.equal(z, rz), "zero points differ from the reference"
    assert (s > 0).all()
    if symmetric:
        assert (z == 0).all()
    else:
        assert ((z >= lo) & (z <= hi)).all()

    # quantize
    codes, s2, z2 = F.quantize(w, bits, symmetric, strategy, group_size)
    assert torch.equal(s2, s) and torch.equal(z2, z)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    rcodes = R.quantize(w, rs2d, rz2d, bits, gs)
    assert torch.equal(codes, rcodes), "codes differ from the reference"
    assert codes.min() >= lo and codes.max() <= hi

    # dequantize (dtype follows the scale)
    deq = F.dequantize(codes, s, z)
    assert deq.dtype == w.dtype and deq.shape == w.shape
    assert torch.equal(deq, R.dequantize(rcodes, rs2d, rz2d, gs, w.dtype))
    if symmetric:
        assert torch.equal(F.dequantize(codes, s), deq), "zero_point=None must mean zero"

    # fake_quantize == dequantize(quantize) exactly, from the observer or from given params
    fq = F.fake_quantize(w, bits, symmetric, strategy, group_size)
    assert fq.dtype == w.dtype and fq.shape == w.shape
    assert torch.equal(fq, deq)
    assert torch.equal(fq, R.fake_quantize(w, rs2d, rz2d, bits, gs))
    assert torch.equal(F.fake_quantize(w, bits, scale=s, zero_point=z), deq)

    # the raw ops agree with the functional layer
    if strategy == "tensor":
        os_, oz = ops.quant_params(w.reshape(1, -1), bits, symmetric, w.numel())
        assert torch.equal(os_.reshape(1), s) and torch.equal(oz.reshape(1), z)
    else:
        os_, oz = ops.quant_params(w, bits, symmetric, gs)
        assert torch.equal(os_, s) and torch.equal(oz, z)
    s2d, z2d = per_row(s, rows), per_row(z, rows)
    assert torch.equal(ops.quantize(w, s2d, z2d, bits, gs), rcodes)
    assert torch.equal(ops.dequantize(codes, s2d, z2d, gs, w.dtype), deq)
    assert torch.equal(ops.fake_quantize(w, s2d, z2d, bits, gs), deq)
    if symmetric:
        assert torch.equal(ops.quantize(w, s2d, None, bits, gs), rcodes)
        assert torch.equal(ops.fake_quantize(w, s2d, None, bits, gs), deq)

    # non-contiguous weights give the same answers
    for how in ("slice", "transpose"):
        wn = noncontig(w, how)
        cn, sn, zn = F.quantize(wn, bits, symmetric, strategy, group_size)
        assert torch.equal(cn, codes) and torch.equal(sn, s) and torch.equal(zn, z), how
        assert torch.equal(F.fake_quantize(wn, bits, symmetric, strategy, group_size), deq), how
        assert torch.equal(ops.quantize(wn, s2d, z2d, bits, gs), rcodes), how
    assert torch.equal(F.dequantize(noncontig(codes), noncontig(s2d.contiguous()) if s.dim() == 2 else s,
                                    noncontig(z2d.contiguous()) if z.dim() == 2 else z), deq)

    # min-max covers every value, so in fp32 the error is at most half a step
    if check_bound and w.dtype == torch.float32:
        step = per_column(rs2d, gs)
        assert ((w - deq).abs() <= step * (0.5 + 1e-4)).all()
    return codes, s, z


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_minmax_matches_reference(layout, bits, symmetric, dtype, gen):
    rows, cols, strategy, gs = layout
    check_minmax(rand_weight(rows, cols, dtype, gen), bits, symmetric, strategy, gs)


BIG_CASES = (
    [(layout, b, sym, torch.float32) for layout in BIG_LAYOUTS for b in (3, 4, 8) for sym in (True, False)]
    + [(layout, 4, sym, dt) for layout in BIG_LAYOUTS[:3] for sym in (True, False)
       for dt in (torch.float16, torch.bfloat16)]
)


@pytest.mark.parametrize(
    "layout,bits,symmetric,dtype", BIG_CASES,
    ids=[f"{layout_id(c[0])}-b{c[1]}-{'sym' if c[2] else 'asym'}-{dtype_id(c[3])}" for c in BIG_CASES],
)
def test_minmax_matches_reference_wide(layout, bits, symmetric, dtype, gen):
    rows, cols, strategy, gs = layout
    check_minmax(rand_weight(rows, cols, dtype, gen), bits, symmetric, strategy, gs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("magnitude", ["subnormal-scale", "huge"])
def test_minmax_extreme_magnitudes(dtype, magnitude, gen):
    """Scales in the dtype's subnormal range and near its largest values still match."""
    info = torch.finfo(dtype)
    std = info.tiny * 8 if magnitude == "subnormal-scale" else info.max / 64
    w = (torch.randn(9, 64, generator=gen, dtype=torch.float32) * std).clamp(-info.max / 4, info.max / 4)
    w = w.to(dtype)
    assert torch.isfinite(w).all()
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            # (a subnormal scale is itself inexact, so the half-step bound does not apply)
            check_minmax(w, bits, symmetric, "group", 32, check_bound=magnitude == "huge")


# ------------------------------------------------------------------------- the MSE observer

MSE_LAYOUTS = [
    (17, 128, "group", 32),
    (17, 129, "channel", None),
    (5, 256, "group", 128),
    (17, 7, "group", 7),
    (5, 7, "tensor", None),
    (17, 1, "channel", None),
]
MSE_CASES = [
    (MSE_LAYOUTS[i % len(MSE_LAYOUTS)], bits, sym, dt)
    for i, (bits, sym, dt) in enumerate(
        (b, s, d) for b in BITS for s in (True, False) for d in FLOAT_DTYPES
    )
] + [
    ((3, 4097, "channel", None), 4, True, torch.float32),
    ((2, 4096, "group", 128), 4, False, torch.bfloat16),
]


def recon_error(w, s2d, z2d, bits, gs, norm=2.0):
    """Sum over each [row, group] of |fake_quant(w) - w|^norm, in fp32 (not rounded to w.dtype)."""
    rows, cols = w.shape
    deq = R.dequantize(R.quantize(w, s2d, z2d, bits, gs), s2d, z2d, gs, torch.float32)
    d = (deq - w.float()).abs().reshape(rows, cols // gs, gs)
    return (d * d).sum(-1) if norm == 2.0 else d.pow(norm).sum(-1)


@pytest.mark.parametrize(
    "layout,bits,symmetric,dtype", MSE_CASES,
    ids=[f"{layout_id(c[0])}-b{c[1]}-{'sym' if c[2] else 'asym'}-{dtype_id(c[3])}" for c in MSE_CASES],
)
def test_mse_matches_reference(layout, bits, symmetric, dtype, gen):
    rows, cols, strategy, group_size = layout
    w = rand_weight(rows, cols, dtype, gen)
    rs, rz, rs2d, rz2d, gs = reference_params(w, bits, symmetric, strategy, group_size, "mse")

    s, z = F.quant_params(w, bits, symmetric, strategy, group_size, observer="mse")
    assert tuple(s.shape) == expected_param_shape(rows, cols, strategy, group_size)
    assert s.dtype == w.dtype and z.dtype == torch.int8
    if symmetric:
        assert (z == 0).all()
    s2d, z2d = per_row(s, rows), per_row(z, rows)

    same = (s == rs) & (z == rz)
    n = same.numel()
    if same.float().mean() < 0.99:
        i = (~same).nonzero()[0].tolist()
        pytest.fail(
            f"{n - int(same.sum())} of {n} groups differ from the reference's MSE choice; first at "
            f"{i}: scale {s[tuple(i)].item()!r} zero {z[tuple(i)].item()} vs reference "
            f"{rs[tuple(i)].item()!r} zero {rz[tuple(i)].item()}"
        )

    # lowbit's choice reconstructs as well as the reference's
    mine = recon_error(w, s2d, z2d, bits, gs).sum()
    theirs = recon_error(w, rs2d, rz2d, bits, gs).sum()
    assert abs(mine - theirs) <= 1e-4 * theirs

    # the search starts from min-max and only accepts improvements of its |err|^2.4 objective
    ms, mz, ms2d, mz2d, _ = reference_params(w, bits, symmetric, strategy, group_size, "minmax")
    e_mse = recon_error(w, s2d, z2d, bits, gs, norm=2.4)
    e_minmax = recon_error(w, ms2d, mz2d, bits, gs, norm=2.4)
    if strategy == "tensor":  # one group: the whole tensor
        e_mse, e_minmax = e_mse.sum(), e_minmax.sum()
    assert (e_mse <= e_minmax * (1 + 1e-5) + 1e-30).all()

    # quantize / fake_quantize with the MSE observer use exactly those parameters
    codes, s3, z3 = F.quantize(w, bits, symmetric, strategy, group_size, observer="mse")
    assert torch.equal(s3, s) and torch.equal(z3, z)
    assert torch.equal(codes, R.quantize(w, s2d, z2d, bits, gs))
    fq = F.fake_quantize(w, bits, symmetric, strategy, group_size, observer="mse")
    assert torch.equal(fq, F.dequantize(codes, s, z))
    assert torch.equal(fq, R.fake_quantize(w, s2d, z2d, bits, gs))
    sn, zn = F.quant_params(noncontig(w), bits, symmetric, strategy, group_size, observer="mse")
    assert torch.equal(sn, s) and torch.equal(zn, z)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("strategy,group_size", [("group", 32), ("channel", None), ("tensor", None)])
def test_imatrix_mse_matches_reference(strategy, group_size, dtype, symmetric, gen):
    """imatrix_mse: the MSE search with each column's error weighted by its importance
    (normalised by the mean), llmcompressor's grid (p = 1 - i/20, i < 20) and |err|^3."""
    w = rand_weight(13, 96, dtype, gen)
    importance = torch.rand(96, generator=gen) ** 4 * 10  # a few dominant columns
    s, z = F.quant_params(w, 4, symmetric, strategy, group_size, observer="imatrix_mse", importance=importance)
    imp = importance / importance.mean()
    rs, rz, *_ = reference_params(w, 4, symmetric, strategy, group_size, "imatrix_mse", maxshrink=1.0, grid=20,
                                  norm=3.0, importance=imp.repeat(13) if strategy == "tensor" else imp)
    same = (s == rs) & (z == rz)
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {same.numel()} groups differ from the reference"
    sn, zn = F.quant_params(noncontig(w), 4, symmetric, strategy, group_size, observer="imatrix_mse",
                            importance=importance)
    assert torch.equal(sn, s) and torch.equal(zn, z)
    codes, s3, z3 = F.quantize(w, 4, symmetric, strategy, group_size, "imatrix_mse", importance=importance)
    assert torch.equal(s3, s) and torch.equal(z3, z)


def test_imatrix_weights_move_the_range(gen):
    """Heavy importance on some columns lowers their weighted error relative to plain MSE, and
    uniform importance gives the plain search on the imatrix grid."""
    w = rand_weight(64, 128, torch.float32, gen)
    importance = torch.ones(128)
    importance[::16] = 1000.0
    si, zi = F.quant_params(w, 3, False, "group", 32, "imatrix_mse", importance=importance)
    sm, zm = F.quant_params(w, 3, False, "group", 32, "mse")

    def weighted(s, z):
        d = (R.fake_quantize(w, s, z, 3, 32) - w).abs().pow(3)
        return (d * importance).sum()

    assert weighted(si, zi) < weighted(sm, zm)
    su, zu = F.quant_params(w, 3, False, "group", 32, "imatrix_mse", importance=torch.full((128,), 7.0))
    ru, rzu = R.quant_params(w, 3, False, 32, "mse", maxshrink=1.0, grid=20, norm=3.0)
    assert torch.equal(su, ru) and torch.equal(zu, rzu)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(observer="imatrix_mse", importance=torch.ones(5)), ValueError, r"importance must be a float tensor of shape \[96\]"),
    (dict(observer="mse", importance=torch.ones(96)), ValueError, r"only used by the 'imatrix_mse' observer"),
    (dict(observer="imatrix_mse", importance=torch.ones(96, dtype=torch.int64)), ValueError, r"float tensor"),
])
def test_imatrix_bad_importance(kwargs, err, match):
    with pytest.raises(err, match=match):
        F.quant_params(torch.randn(4, 96), 4, True, "group", 32, **kwargs)


def test_imatrix_raw_op_checks():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="takes importance weights"):
        ops.quant_params(w, 4, True, 32, "imatrix_mse")
    with pytest.raises(ValueError, match="takes importance weights"):
        ops.quant_params(w, 4, True, 32, "mse", importance=torch.ones(96))
    with pytest.raises(ValueError, match=r"importance must have shape \[96\]"):
        ops.quant_params(w, 4, True, 32, "imatrix_mse", importance=torch.ones(95))
    with pytest.raises(ValueError, match="finite and >= 0"):
        ops.quant_params(w, 4, True, 32, "imatrix_mse", importance=torch.full((96,), -1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        ops.quant_params(w, 4, True, 32, "imatrix_mse", importance=torch.full((96,), float("nan")))


def test_imatrix_without_importance_warns_once():
    import lowbit.functional as LF

    LF._warned_no_importance = False
    w = torch.randn(8, 64)
    with pytest.warns(UserWarning, match="no importance data"):
        s, z = F.quant_params(w, 4, True, "group", 32, "imatrix_mse")
    ru, rzu = R.quant_params(w, 4, True, 32, "mse", maxshrink=1.0, grid=20, norm=3.0)
    assert torch.equal(s, ru) and torch.equal(z, rzu)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("norm,maxshrink,grid", [(2.0, 0.8, 100), (2.0, 0.5, 20), (3.0, 0.25, 40)])
def test_mse_search_options(norm, maxshrink, grid, symmetric, gen):
    """The raw op's search options (squared error branch included) follow the reference."""
    w = rand_weight(17, 128, torch.float32, gen)
    kw = dict(maxshrink=maxshrink, grid=grid, norm=norm)
    s, z = ops.quant_params(w, 4, symmetric, 32, "mse", **kw)
    rs, rz = R.quant_params(w, 4, symmetric, 32, "mse", **kw)
    same = (s == rs) & (z == rz)
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {same.numel()} groups differ"
    mine = recon_error(w, s, z, 4, 32, norm).sum()
    theirs = recon_error(w, rs, rz, 4, 32, norm).sum()
    assert abs(mine - theirs) <= 1e-4 * theirs
    # a narrower search (smaller maxshrink) can never reach a smaller scale than allowed
    lo = w.reshape(17, 4, 32).amin(-1).clamp(max=0)
    hi = w.reshape(17, 4, 32).amax(-1).clamp(min=0)
    widest = (torch.maximum(-lo, hi) / 7.5) if symmetric else (hi - lo) / 15
    assert (s >= widest * (1 - maxshrink) * (1 - 1e-6)).all()


# ------------------------------------------------------------------------------ known values

HALF_EVEN_ROW = [7.5, -7.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 6.5, 5.5, -6.5, 0.25, -0.75, 4.5, -3.5]
HALF_EVEN_CODES = [7, -8, 0, 2, 2, 0, -2, -2, 4, 6, 6, -6, 0, -1, 4, -4]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("strategy,group_size", [("group", 16), ("channel", None), ("tensor", None)])
def test_symmetric_int4_absmax_7_5_gives_scale_1_and_rounds_half_to_even(strategy, group_size, dtype):
    row = torch.tensor(HALF_EVEN_ROW)
    w = torch.stack([row, -row.flip(0), row * 0.5]).to(dtype)  # every row has absmax 7.5 except the last
    w[2, 0] = 7.5
    s, z = F.quant_params(w, 4, True, strategy, group_size)
    assert (s == 1.0).all(), s
    assert (z == 0).all()
    codes, _, _ = F.quantize(w, 4, True, strategy, group_size)
    expected = torch.tensor(HALF_EVEN_CODES, dtype=torch.int8)
    assert codes[0].tolist() == expected.tolist()
    # the other rows: clamp to [-8, 7], then torch.round (half to even) of w / 1.0
    for r in (1, 2):
        assert codes[r].tolist() == torch.round(w[r].float().clamp(-8, 7)).to(torch.int8).tolist()
    assert codes[1, 15] == -8 and codes[1, 14] == 7  # -7.5 rounds to -8, +7.5 saturates at 7
    deq = F.dequantize(codes, s)
    assert torch.equal(deq, codes.to(dtype))
    assert torch.equal(F.fake_quantize(w, 4, True, strategy, group_size), deq)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_symmetric_int8_absmax_127_5_gives_scale_1(dtype):
    w = torch.tensor([[127.5, -127.5, 0.5, 1.5, 126.5, -2.5, -126.5, 3.0]], dtype=dtype)
    codes, s, z = F.quantize(w, 8, True, "channel")
    assert s.item() == 1.0 and z.item() == 0
    assert codes.tolist() == [[127, -128, 0, 2, 126, -2, -126, 3]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_asymmetric_known_values_and_half_even_zero_point(dtype):
    # range [-1.5, 13.5] over 15 steps: scale 1; zero = round(-8 + 1.5) = round(-6.5) = -6
    # (half to even; half away from zero would give -7)
    w = torch.tensor([[-1.5, 13.5, 0.5, 2.5], [0.0, 15.0, 7.0, 3.0]], dtype=dtype)
    codes, s, z = F.quantize(w, 4, False, "channel")
    assert s.flatten().tolist() == [1.0, 1.0]
    assert z.flatten().tolist() == [-6, -8]
    # row 0: -1.5-6 = -7.5 -> -8, 13.5-6 = 7.5 -> clamp 7, 0.5-6 = -5.5 -> -6, 2.5-6 = -3.5 -> -4
    assert codes.tolist() == [[-8, 7, -6, -4], [-8, 7, -1, -5]]
    assert F.dequantize(codes, s, z).float().tolist() == [[-2.0, 13.0, 0.0, 2.0], [0.0, 15.0, 7.0, 3.0]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_groups(bits, observer, symmetric, dtype, gen):
    eps = torch.finfo(dtype).eps
    w = rand_weight(3, 64, dtype, gen, std=1.0)
    w[1, :32] = 0
    w[2, 32:] = 0
    zero_groups = torch.tensor([[False, False], [True, False], [False, True]])
    codes, s, z = F.quantize(w, bits, symmetric, "group", 32, observer)
    assert (s[zero_groups] == eps).all(), s
    assert (s[~zero_groups] > eps).all()
    group_codes = codes.reshape(3, 2, 32)[zero_groups]
    if symmetric:
        assert (group_codes == 0).all()
    else:
        # the codes sit on the zero point, so they dequantize to exactly zero
        assert (group_codes == z[zero_groups][:, None]).all()
    deq = F.dequantize(codes, s, z)
    assert (deq.reshape(3, 2, 32)[zero_groups] == 0).all()
    fq = F.fake_quantize(w, bits, symmetric, "group", 32, observer)
    assert torch.equal(fq, deq)
    rs, rz = R.quant_params(w, bits, symmetric, 32, observer)
    assert torch.equal(s[zero_groups], rs[zero_groups]) and torch.equal(z[zero_groups], rz[zero_groups])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_all_zero_weight(strategy, symmetric, dtype):
    w = torch.zeros(5, 7, dtype=dtype)
    codes, s, z = F.quantize(w, 4, symmetric, strategy)
    assert (s == torch.finfo(dtype).eps).all() and s.dtype == dtype
    if symmetric:
        assert (codes == 0).all()
    deq = F.dequantize(codes, s, z)
    assert (deq == 0).all() and deq.dtype == dtype
    assert (F.fake_quantize(w, 4, symmetric, strategy) == 0).all()


# ------------------------------------------------------------------- dequantize specifics

@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale_dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dequantize_output_dtype(scale_dtype, out_dtype, gen):
    codes = torch.randint(-8, 8, (7, 64), generator=gen, dtype=torch.int8)
    scale = (torch.rand(7, 2, generator=gen) + 0.01).to(scale_dtype)
    zero = torch.randint(-8, 8, (7, 2), generator=gen, dtype=torch.int8)
    out = F.dequantize(codes, scale, zero, dtype=out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, R.dequantize(codes, scale, zero, 32, out_dtype))
    assert torch.equal(ops.dequantize(codes, scale, zero, 32, out_dtype), out)
    # an int32 zero point is accepted and means the same
    assert torch.equal(F.dequantize(codes, scale, zero.int(), dtype=out_dtype), out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_single_element_scale_broadcasts(dtype, gen):
    w = rand_weight(5, 33, dtype, gen)
    scale = torch.tensor([0.01], dtype=dtype)
    zp = torch.tensor([-3], dtype=torch.int8)
    rs, rz = scale.reshape(1, 1).expand(5, 1), zp.reshape(1, 1).expand(5, 1)
    expected = R.fake_quantize(w, rs, rz, 4, 33)
    assert torch.equal(F.fake_quantize(w, 4, scale=scale, zero_point=zp), expected)
    codes = R.quantize(w, rs, rz, 4, 33)
    assert torch.equal(F.dequantize(codes, scale, zp), expected)
    assert torch.equal(F.dequantize(codes, scale.reshape(1, 1), zp.reshape(1, 1)), expected)


def test_fake_quantize_clamps_out_of_range_values():
    """Given parameters, values beyond the grid saturate at qmin / qmax."""
    w = torch.tensor([[-100.0, -8.6, -8.4, 0.0, 6.6, 7.4, 100.0, 1.0]])
    fq = F.fake_quantize(w, 4, scale=torch.tensor([[1.0]]))
    assert fq.tolist() == [[-8.0, -8.0, -8.0, 0.0, 7.0, 7.0, 7.0, 1.0]]
