"""The compiled extension: a silent import, OpenMP, the registered ops and their fake
(meta) kernels, which torch.compile and FakeTensorMode rely on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lowbit
from lowbit import functional as F
from lowbit import ops

OP_NAMES = ["quant_params", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "packed_linear", "nf4_linear"]


def test_import_prints_nothing():
    proc = subprocess.run([sys.executable, "-c", "import lowbit"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""


def test_parallel_info_mentions_openmp():
    info = lowbit._C.parallel_info()
    assert isinstance(info, str)
    assert "OpenMP" in info
    assert "ATen parallel backend: OpenMP" in info


def _proc_flags() -> set:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_info_matches_proc_cpuinfo():
    info = lowbit.cpu_info()
    flags = _proc_flags()
    for name in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx_vnni"):
        assert info["features"][name.replace("_", "")] == (name in flags), name
    avx2 = {"avx2", "fma", "f16c"} <= flags
    supported = [name for name, ok in (("avx512", avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags),
                                       ("avxvnni", avx2 and "avx_vnni" in flags), ("avx2", avx2),
                                       ("generic", True)) if ok]
    assert info["supported"] == supported
    assert info["detected"] == supported[0]


@pytest.mark.parametrize("name", lowbit.cpu.ISAS)
def test_set_isa_lowers_or_refuses(name):
    before = lowbit.cpu_info()["active"]
    if name in lowbit.supported_isas():
        with lowbit.use_isa(name):
            assert lowbit.cpu_info()["active"] == name
    else:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            lowbit.set_isa(name)
    assert lowbit.cpu_info()["active"] == before
    with pytest.raises(ValueError, match="unknown ISA"):
        lowbit.set_isa("sse9")
    with pytest.raises(TypeError):
        lowbit.set_isa(2)


def test_lowbit_isa_environment_variable():
    code = "import lowbit; print(lowbit.cpu_info()['active'])"
    env = dict(os.environ, LOWBIT_ISA="generic")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "generic", out.stderr
    env["LOWBIT_ISA"] = "bogus"
    code = "import lowbit, torch; lowbit.ops.quantize(torch.zeros(2, 8), torch.ones(2, 1), None, 4, 8)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "unknown ISA 'bogus'" in out.stderr


AS_CPU = os.path.join(os.path.dirname(__file__), "..", "scripts", "as_cpu.sh")


def test_as_cpu_caps_lowbit_and_the_dense_peers():
    """scripts/as_cpu.sh (how the benchmarks time an AVX2-only or older CPU on a newer one) lowers
    lowbit's path and caps MKL / oneDNN / ATen with it, and the benchmarks then time that path alone."""
    code = ("import os, sys; sys.path.insert(0, 'benchmarks'); import lowbit; from _timing import isa_paths, peer_caps; "
            "print(lowbit.cpu_info()['active'], isa_paths(), os.environ['ATEN_CPU_CAPABILITY'], peer_caps())")
    out = subprocess.run(["bash", AS_CPU, "generic", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["generic", "['generic']", "default"], out.stdout
    assert "MKL_ENABLE_INSTRUCTIONS=SSE4_2" in out.stdout
    bad = subprocess.run(["bash", AS_CPU, "sse9", "true"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_env_command_names_the_path():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "env"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LOWBIT_ISA="generic"))
    assert out.returncode == 0, out.stderr
    assert "kernels: generic" in out.stdout and f"detected {lowbit.cpu_info()['detected']}" in out.stdout


@pytest.mark.parametrize("path", lowbit.supported_isas())
def test_env_command_names_the_int8_kernel(path, capsys):
    from lowbit import cli

    vnni = {"avx512": "AVX-512 VNNI" if lowbit.cpu_info()["features"]["avx512vnni"] else "avx512",
            "avxvnni": "AVX-VNNI"}
    with lowbit.use_isa(path):
        cli.main(["env"])
    out = capsys.readouterr().out
    assert f"kernels: {path} (" in out and f"int8 GEMM: {vnni.get(path, path)} kernel\n" in out, out


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_registered_with_cpu_kernel(name):
    assert hasattr(torch.ops.lowbit, name)
    op = getattr(torch.ops.lowbit, name).default
    assert op._schema.name == f"lowbit::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowbit::{name}", "CPU")


# Real CPU arguments for each op, as lowbit.ops passes them (every argument spelled out).
def _cases():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 64, generator=gen)
    s, z = ops.quant_params(w, 4, False, 32)
    codes = ops.quantize(w, s, z, 4, 32)
    packed = ops.pack(codes, 4)
    x = torch.randn(3, 64, generator=gen)
    nf4_packed, nf4_absmax = ops.nf4_quantize(w, 32, "nf4")
    nf4_codes, nf4_nested = ops.blockwise8_quantize(nf4_absmax - 0.25, F.DYNAMIC_MAP, 256)
    return {
        "quant_params": (w, 4, False, 32, "minmax", 0.8, 100, 2.4),
        "quant_params_mse": (w.half(), 3, True, 16, "mse", 0.5, 20, 2.0),
        "quantize": (w, s, z, 4, 32),
        "quantize_no_zero": (w.bfloat16(), s, None, 4, 32),
        "dequantize": (codes, s, z, 32, torch.float16),
        "fake_quantize": (w, s, z, 4, 32),
        "pack": (codes, 4),
        "pack_3bit": (codes.clamp(-4, 3), 3),
        "unpack": (packed, 4, 64),
        "packed_linear": (x, packed, s, z, 4, 32, torch.randn(5, generator=gen)),
        "packed_linear_3d_no_bias": (x.reshape(3, 1, 64).half(), packed, s, None, 4, 32, None),
        "nf4_linear": (x, *ops.nf4_quantize(w, 32, "nf4"), 32, "nf4", 5, torch.randn(5, generator=gen), None, None, None),
        "nf4_linear_double_quant_3d": (x.reshape(3, 1, 64).bfloat16(), nf4_packed, nf4_codes, 32, "nf4", 5, None,
                                       nf4_nested, F.DYNAMIC_MAP, torch.tensor(0.25)),
    }


CASES = _cases()


def _op(case: str):
    name = next(n for n in sorted(OP_NAMES, key=len, reverse=True) if case.startswith(n))
    return getattr(torch.ops.lowbit, name).default


def _outputs(result):
    return result if isinstance(result, (tuple, list)) else (result,)


@pytest.mark.parametrize("case", CASES)
def test_fake_kernel_matches_real_kernel(case):
    """Under FakeTensorMode each op produces outputs of the real kernel's shape and dtype."""
    args = CASES[case]
    real = _outputs(_op(case)(*args))
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = _outputs(_op(case)(*fake_args))
    assert len(fake) == len(real)
    for f, r in zip(fake, real):
        assert f.shape == r.shape and f.dtype == r.dtype, (case, f.shape, r.shape, f.dtype, r.dtype)


def test_fake_kernels_through_lowbit_ops():
    """The Python wrappers (which always pass the optional arguments) work on fake tensors."""
    with FakeTensorMode():
        w = torch.empty(6, 128, dtype=torch.bfloat16)
        s, z = ops.quant_params(w, 4, True, 32)
        assert s.shape == (6, 4) and s.dtype == torch.bfloat16 and z.dtype == torch.int8
        s, z = ops.quant_params(w, 4, True, 128, "mse")
        assert s.shape == (6, 1)
        codes = ops.quantize(w, s, z, 4, 128)
        assert codes.shape == (6, 128) and codes.dtype == torch.int8
        packed = ops.pack(codes, 3)
        assert packed.shape == (6, 12) and packed.dtype == torch.int32
        assert ops.unpack(packed, 3, 128).shape == (6, 128)
        assert ops.dequantize(codes, s, z, 128, torch.float32).dtype == torch.float32
        assert ops.fake_quantize(w, s, z, 4, 128).dtype == torch.bfloat16
        y = ops.packed_linear(torch.empty(2, 7, 128, dtype=torch.float16), ops.pack(codes, 4), s, z, 4, 128, None)
        assert y.shape == (2, 7, 6) and y.dtype == torch.float16


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    """torch.library.opcheck: schema, autograd registration, fake tensor and AOT dispatch."""
    torch.library.opcheck(_op(case), CASES[case])


@pytest.mark.parametrize("case", ["quantize", "packed_linear", "pack", "unpack", "dequantize"])
def test_meta_inputs(case):
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in CASES[case]]
    real = _outputs(_op(case)(*CASES[case]))
    out = _outputs(_op(case)(*args))
    for o, r in zip(out, real):
        assert o.device.type == "meta"
        assert o.shape == r.shape and o.dtype == r.dtype


def test_meta_quant_params():
    s, z = ops.quant_params(torch.empty(6, 128, device="meta"), 4, True, 32)
    assert s.device.type == "meta" and s.shape == (6, 4) and z.dtype == torch.int8


def test_torch_compile_nf4_linear():
    m = lowbit.nn.NF4Linear.from_linear(torch.nn.Linear(128, 9), double_quant=True)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), m(x))


def test_torch_compile_packed_linear():
    """Dynamo traces the op through its fake kernel (fullgraph: no graph break)."""
    lin = torch.nn.Linear(128, 9)
    m = lowbit.nn.PackedLinear.from_linear(lin, "W4A16")
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), m(x))
