"""Shared fixtures and helpers for lowbit's test suite.

Everything here is deterministic: each test gets its own seeded generator, so a failure
reproduces exactly when the test is run alone.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

import lowbit  # noqa: F401  (registers torch.ops.lowbit.*)

# The reference implementation issues many small ATen ops; with OpenMP on a busy 2-core
# machine those spin and crawl. The suite therefore runs single-threaded (override with
# LOWBIT_TEST_THREADS), and the tests that exercise the kernels' parallel loops say so
# explicitly with `num_threads`.
DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(int(os.environ.get("LOWBIT_TEST_THREADS", "1")))
PARALLEL_THREADS = max(2, DEFAULT_THREADS)


@contextlib.contextmanager
def num_threads(n: int = PARALLEL_THREADS):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Every ISA path this CPU can run (AVX-512, AVX2, portable): kernel test modules run each test on
# each of them with `pytestmark = pytest.mark.usefixtures("isa_path")`. The avxvnni path differs
# from avx2 only in the int8 GEMM, so only the int8 tests add it (`int8_isa_path`).
ALL_ISA_PATHS = lowbit.supported_isas()
ISA_PATHS = [path for path in ALL_ISA_PATHS if path != "avxvnni"]


@pytest.fixture(params=ISA_PATHS)
def isa_path(request):
    with lowbit.use_isa(request.param):
        yield request.param


@pytest.fixture(params=ALL_ISA_PATHS)
def int8_isa_path(request):
    with lowbit.use_isa(request.param):
        yield request.param


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS.get(dtype, str(dtype))


def qrange(bits: int):
    """compressed-tensors' signed integer grid [-2^(b-1), 2^(b-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def make_generator(*key) -> torch.Generator:
    """A generator seeded from `key` (stable across runs and processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's node id: every test (and parametrization) draws
    different but reproducible data."""
    return make_generator(request.node.nodeid)


def rand_weight(rows: int, cols: int, dtype=torch.float32, gen=None, std: float = 0.05) -> torch.Tensor:
    """A weight-like [rows, cols] tensor: Gaussian with a few larger outliers, so groups have
    asymmetric ranges (minimum and maximum of different magnitudes)."""
    w = torch.randn(rows, cols, generator=gen) * std
    outliers = torch.rand(rows, cols, generator=gen) < 0.02
    w = torch.where(outliers, w * 6, w)
    return w.to(dtype)


def rand_codes(rows: int, cols: int, bits: int, gen=None) -> torch.Tensor:
    """Uniform int8 codes on the b-bit grid; the extremes are forced to appear when there is room."""
    lo, hi = qrange(bits)
    c = torch.randint(lo, hi + 1, (rows, cols), generator=gen, dtype=torch.int8)
    flat = c.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = lo, hi
    return c


def noncontig(t: torch.Tensor, how: str = "slice") -> torch.Tensor:
    """A non-contiguous 2-D tensor equal to `t`.

    "slice": every other column of a tensor twice as wide (row stride 2*cols, column stride 2);
    "transpose": the transpose of a contiguous transposed copy (column-major storage).
    """
    assert t.dim() == 2
    r, c = t.shape
    if how == "slice":
        wide = torch.full((r, 2 * c), 7, dtype=t.dtype)
        wide[:, ::2] = t
        out = wide[:, ::2]
    elif how == "transpose":
        out = t.t().contiguous().t()
    else:
        raise ValueError(how)
    assert torch.equal(out, t)
    if (how == "slice" and t.numel() > 1) or min(r, c) > 1:
        assert not out.is_contiguous(), "helper failed to make a non-contiguous tensor"
    return out


def per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Scale / zero point as [rows, groups] (a single tensor-wide element is broadcast)."""
    if t.numel() == 1:
        return t.reshape(1, 1).expand(rows, 1)
    return t


def reference_params(w, bits, symmetric, strategy, group_size, observer="minmax", **kw):
    """The reference's parameters laid out as lowbit.functional returns them, plus the per-row
    [rows, groups] layout and the group size to feed reference.quantize / dequantize."""
    from lowbit import reference as R

    rows, cols = w.shape
    if strategy == "tensor":
        s, z = R.quant_params(w.reshape(1, -1), bits, symmetric, w.numel(), observer, **kw)
        return s.reshape(1), z.reshape(1), s.expand(rows, 1), z.expand(rows, 1), cols
    gs = group_size if strategy == "group" else cols
    s, z = R.quant_params(w, bits, symmetric, gs, observer, **kw)
    return s, z, s, z, gs


@pytest.fixture(scope="session")
def smollm2():
    """The real model (fp32) and its tokenizer, loaded once per session (the GGUF file takes
    seconds to decode); tests that change the model deep-copy it."""
    from lowbit import examples

    return examples.load_smollm2()


def capture_inputs(smollm2, texts, names, max_length: int = 256):
    """Each module in `names`: (its fp32 weight, the inputs it saw while the real model read
    `texts`), the tokens of all texts concatenated."""
    model, tokenizer = smollm2
    modules = dict(model.named_modules())
    inputs = {name: [] for name in names}
    hooks = [modules[name].register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0][0]))
             for name in names]
    try:
        with torch.inference_mode():
            for text in texts:
                model(tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: (modules[name].weight.detach().clone(), torch.cat(inputs[name])) for name in names}


def real_linear_inputs(smollm2):
    """(weight, inputs) of an MLP and an attention Linear of the real model, on one sentence of
    Pride and Prejudice: the real-data case of the kernel tests."""
    return capture_inputs(smollm2, ["It is a truth universally acknowledged, that a single man in possession of a "
                                    "good fortune, must be in want of a wife."],
                          ["model.layers.3.mlp.down_proj", "model.layers.7.self_attn.q_proj"]).values()


# ---------------------------------------------------------------- property-based fuzzing
# tests/test_fuzz.py. "ci" (the default) is deterministic (derandomize) and sized for about
# two minutes on two cores; `pytest --hypothesis-profile=thorough` runs ten times as many
# cases with fresh random seeds. No deadline: a busy CI machine must not make a test flaky.
try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ImportError:  # the fuzz suite is skipped without hypothesis (the `test` extra has it)
    pass
else:
    _FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    _hypothesis_settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, database=None,
                                          print_blob=True, suppress_health_check=_FUZZ_HEALTH)
    _hypothesis_settings.register_profile("thorough", max_examples=3000, deadline=None, database=None,
                                          print_blob=True, suppress_health_check=_FUZZ_HEALTH)
    _hypothesis_settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS_PROFILE", "ci"))

# Generated cases, by kind, counted by test_fuzz.py and reported in the terminal summary.
FUZZ_COUNTS = {"valid": 0, "invalid": 0}


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS["valid"] or FUZZ_COUNTS["invalid"]:
        terminalreporter.write_line(
            f"lowbit fuzz: {FUZZ_COUNTS['valid'] + FUZZ_COUNTS['invalid']} generated cases "
            f"({FUZZ_COUNTS['valid']} valid, {FUZZ_COUNTS['invalid']} invalid)")


@pytest.fixture(scope="session")
def llama_bin():
    """llama.cpp's bin directory (built once by scripts/build_llama_cpp.sh, then cached)."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["bash", os.path.join(repo, "scripts", "build_llama_cpp.sh")], capture_output=True, text=True)
    assert out.returncode == 0, f"scripts/build_llama_cpp.sh failed:\n{out.stderr[-2000:]}"
    return out.stdout.strip().splitlines()[-1]
