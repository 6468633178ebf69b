"""GPTQ's C++ kernels (Hessian accumulation, blocked solve) against the pure-PyTorch
transcription in lowbit.reference.gptq, plus the damping escalation and RTN fallback."""

from __future__ import annotations

import pytest
import torch

from lowbit import functional as F
from lowbit.reference import gptq as R

from conftest import make_generator

# Every kernel test runs on each ISA path this CPU supports (AVX-512, AVX2, portable).
pytestmark = pytest.mark.usefixtures("isa_path")


def layer_inputs(n, cols, gen):
    """Correlated activations with uneven channel scales, like a real layer's inputs."""
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    return (torch.randn(n, cols, generator=gen) @ mix) * (torch.rand(cols, generator=gen) * 3 + 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 7, 300])
def test_hessian_matches_reference_and_streams(dtype, cols):
    gen = make_generator("hessian", cols, dtype)
    x = layer_inputs(90, cols, gen).to(dtype)
    h, n = F.hessian(x[None])  # [batch, tokens, cols] is flattened
    ref, _ = R.hessian(x)
    assert n == 90
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(h, h.t(), rtol=0, atol=0)  # mirrored, exactly symmetric
    h1, n1 = F.hessian(x[:31])
    h2, n2 = F.hessian(x[31:], h1, n1)
    assert n2 == 90
    torch.testing.assert_close(h2, h, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("cols", [1, 63, 64, 65, 300, 600])
def test_streamed_upper_triangle_then_mirror_equals_the_whole_hessian(cols):
    gen = make_generator("hessian-mirror", cols)
    x = layer_inputs(70, cols, gen)
    h, n = F.hessian(x[:40], mirror=False)
    h, n = F.hessian(x[40:], h, n, mirror=False)
    whole, _ = F.hessian(x)
    upper = h.triu()
    assert F.mirror_hessian_(h) is h
    assert torch.equal(h.triu(), upper) and torch.equal(h, h.t())
    torch.testing.assert_close(h, whole)
    with pytest.raises(ValueError, match="square, contiguous float32"):
        F.mirror_hessian_(torch.zeros(cols, cols + 1))


def test_hessian_non_contiguous_input():
    gen = make_generator("hessian-nc")
    x = layer_inputs(64, 96, gen)
    torch.testing.assert_close(F.hessian(x.t().contiguous().t())[0], F.hessian(x.contiguous())[0])


def processing_order(h, actorder):
    return R.column_groups(h, h.shape[0], 1, actorder)[0]


CASES = [(bits, gs, sym, actorder) for bits, gs in [(4, 32), (4, 128), (4, None), (3, 64), (8, 128), (2, 32)]
         for sym in (True, False) for actorder in (None, "static", "group")]


@pytest.mark.parametrize("bits,group_size,symmetric,actorder", CASES)
def test_gptq_matches_reference(bits, group_size, symmetric, actorder):
    gen = make_generator("gptq", bits, group_size, symmetric, actorder)
    rows, cols = 37, 256
    w = torch.randn(rows, cols, generator=gen) * 0.05
    h, _ = F.hessian(layer_inputs(400, cols, gen))
    got = F.gptq(w, h, bits=bits, group_size=group_size, symmetric=symmetric, actorder=actorder, block_size=64)
    codes, scale, zero, g_idx, loss, updated = R.gptq(w, h, bits=bits, group_size=group_size or cols,
                                                      symmetric=symmetric, actorder=actorder, block_size=64)
    assert torch.equal(got.scale, scale) and torch.equal(got.zero_point, zero) and torch.equal(got.g_idx, g_idx)
    assert_same_solve(got, codes, updated, scale, zero, g_idx, loss, processing_order(h, actorder))
    assert got.damping == 0.01


def assert_same_solve(got, codes, updated, scale, zero, g_idx, loss, order):
    """Codes identical except for rounding ties; updated weights within 1e-4 on every row
    that no tie touched. A tie is a value within 1e-3 code units of a rounding boundary, where
    a last-bit difference (a GEMM summing in another order) may round either way; everything
    after it in that row (in processing `order`) then differs legitimately."""
    differ = got.codes != codes
    assert differ.any(dim=1).float().mean().item() <= 0.05
    for row in differ.any(dim=1).nonzero().flatten().tolist():
        col = order[differ[row][order].nonzero()[0].item()].item()  # the row's first flip is the tie
        g = g_idx[col].item()
        t = updated[row, col].item() / scale[row, g].float().item() + zero[row, g].item()
        assert abs(abs(t - int(t)) - 0.5) < 1e-3, (row, col, t)
    clean = ~differ.any(dim=1)
    assert ((got.weight[clean] - updated[clean]).norm() / updated[clean].norm()).item() < 1e-4
    if not differ.any():
        assert got.loss == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_half_precision_weights(dtype):
    gen = make_generator("gptq-half", dtype)
    w = (torch.randn(16, 128, generator=gen) * 0.05).to(dtype)
    h, _ = F.hessian(layer_inputs(256, 128, gen))
    got = F.gptq(w, h, bits=4, group_size=32)
    codes, scale, zero, g_idx, loss, updated = R.gptq(w, h, bits=4, group_size=32, symmetric=True, actorder="static")
    assert got.scale.dtype == dtype and torch.equal(got.scale, scale)
    assert_same_solve(got, codes, updated, scale, zero, g_idx, loss, processing_order(h, "static"))


@pytest.mark.parametrize("block_size", [1, 16, 100, 1000])
def test_block_size_does_not_change_the_result(block_size):
    gen = make_generator("gptq-block")
    w = torch.randn(24, 160, generator=gen) * 0.05
    h, _ = F.hessian(layer_inputs(300, 160, gen))
    base = F.gptq(w, h, bits=4, group_size=32, block_size=128)
    got = F.gptq(w, h, bits=4, group_size=32, block_size=block_size)
    assert (got.codes != base.codes).float().mean().item() < 1e-3
    assert ((got.weight - base.weight).norm() / base.weight.norm()).item() < 1e-5


def test_gptq_beats_rtn_on_layer_output():
    gen = make_generator("gptq-vs-rtn")
    x = layer_inputs(1024, 256, gen)
    w = torch.randn(128, 256, generator=gen) * 0.05
    h, _ = F.hessian(x)
    for actorder in (None, "static", "group"):
        r = F.gptq(w, h, bits=4, group_size=64, actorder=actorder)
        q = F.dequantize(r.codes, r.scale, r.zero_point) if actorder != "group" else \
            (r.codes.float() * r.scale.float()[:, r.g_idx.long()])
        rtn = F.fake_quantize(w, 4, True, "group", 64)
        assert (x @ (w - q).t()).norm() < 0.9 * (x @ (w - rtn).t()).norm(), actorder


def test_dead_columns_are_zeroed():
    gen = make_generator("gptq-dead")
    x = layer_inputs(200, 64, gen)
    x[:, [3, 40]] = 0  # inputs that never fire
    w = torch.randn(8, 64, generator=gen)
    r = F.gptq(w, F.hessian(x)[0], bits=4, group_size=32, symmetric=True)
    assert torch.all(r.codes[:, [3, 40]] == 0) and torch.all(r.weight[:, [3, 40]] == 0)


def test_rank_deficient_hessian_escalates_damping_then_falls_back_to_rtn():
    gen = make_generator("gptq-escalate")
    w = torch.randn(8, 32, generator=gen) * 0.1
    # Fewer tokens than columns: singular but positive semi-definite, the first damping works.
    h, _ = F.hessian(layer_inputs(5, 32, gen))
    assert F.gptq(w, h, bits=4, group_size=32).damping == 0.01
    # An indefinite matrix (not a real Hessian) needs more damping: the step doubles.
    h = torch.eye(32)
    h[0, 0] = -0.1  # mean(diag) ~ 0.96: 0.01 and 0.02 of it are too small, 0.16 works
    r = F.gptq(w, h, bits=4, group_size=32, actorder=None)
    assert r.damping == pytest.approx(0.16)
    codes, *_ = R.gptq(w, h, bits=4, group_size=32, symmetric=True, actorder=None)
    assert torch.equal(r.codes, codes)
    # Hopeless: no damping up to mean(diag H) helps, so the result is plain RTN.
    h = -torch.eye(32) * 0.5
    h[0, 0] = 20.0
    r = F.gptq(w, h, bits=4, group_size=32, actorder=None)
    assert r.damping == -1
    assert torch.equal(r.codes, F.quantize(w, 4, True, "group", 32)[0])


@pytest.mark.parametrize("call,match", [
    (lambda w, h: F.gptq(w, h[:10, :10]), r"hessian must be a \[64, 64\] tensor"),
    (lambda w, h: F.gptq(w, h.index_fill(0, torch.tensor([1]), float("nan")), group_size=32), r"hessian contains NaN"),
    (lambda w, h: F.gptq(w, h, actorder="dynamic"), r"actorder must be one of"),
    (lambda w, h: F.gptq(w, h, dampening_frac=0), r"dampening_frac must be in \(0, 1\]"),
    (lambda w, h: F.gptq(w, h, block_size=0), r"block_size must be positive"),
    (lambda w, h: F.gptq(w, h, group_size=48), r"group_size 48 does not divide the 64 input columns"),
    (lambda w, h: F.gptq(w, h, bits=9), r"bits must be an integer in 2\.\.8"),
    (lambda w, h: F.hessian(torch.full((4, 64), float("nan"))), r"inputs contain NaN or Inf.*layer"),
    (lambda w, h: F.hessian(torch.empty(0, 64)), r"inputs is empty"),
])
def test_bad_inputs(call, match):
    w = torch.randn(8, 64)
    h, _ = F.hessian(torch.randn(100, 64))
    with pytest.raises(ValueError, match=match):
        call(w, h)
