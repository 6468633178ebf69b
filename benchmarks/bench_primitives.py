"""Foundation benchmark: quantize+pack throughput and the packed W4A16 linear, each as a
ratio against a peer timed in the same run.

    python benchmarks/bench_primitives.py [--quick]

Peers: lowbit.reference (pure PyTorch), fp32 dense F.linear (MKL), and torch's own CPU int4
kernel aten._weight_int4pack_mm_for_cpu (bf16 activations, its fastest mode here).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit import functional as LF
from lowbit import reference as R

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_time, print_table  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]
GROUP = 128


def quantize_pack_lowbit(w):
    codes, scale, zero = LF.quantize(w, 4, True, "group", GROUP)
    return LF.pack(codes, 4), scale


def quantize_pack_reference(w):
    scale, zero = R.quant_params(w, 4, True, GROUP)
    return R.pack(R.quantize(w, scale, zero, 4, GROUP), 4), scale


def torch_int4_peer(w, batch):
    """aten's int4 CPU matmul on the same codes and scales (uint4 with zero 8, bf16 activations)."""
    codes, scale, _ = LF.quantize(w, 4, True, "group", GROUP)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8), 1)
    scale_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], -1).to(torch.bfloat16).contiguous()
    x = torch.randn(batch, w.shape[1], dtype=torch.bfloat16)
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scale_zeros)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first shape only")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, threads {torch.get_num_threads()}, "
          f"kernels: {lowbit.cpu_info()['active']} path\n")

    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f)
        gb = w.numel() * 4 / 1e9
        t_lb = best_time(lambda: quantize_pack_lowbit(w), repeat=5)
        t_ref = best_time(lambda: quantize_pack_reference(w), repeat=3, warmup=1)
        rows.append([f"{out_f}x{in_f}", f"{gb / t_lb:.2f}", f"{gb / t_ref:.2f}", f"{t_ref / t_lb:.1f}x"])
    print("quantize + pack, W4 g128 symmetric, fp32 input (GB/s of input)")
    print_table(["shape", "lowbit GB/s", "reference GB/s", "speedup"], rows)
    print()

    rows = []
    for out_f, in_f in shapes:
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        packed = lowbit.nn.PackedLinear.from_linear(linear, "W4A16")
        weight = linear.weight.detach()
        peer_ok = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        for batch in (1, 16):
            x = torch.randn(batch, in_f)
            with torch.inference_mode():
                t_lb = best_time(lambda: packed(x))
                t_dense = best_time(lambda: F.linear(x, weight))
                t_ref = best_time(lambda: R.packed_linear(x, packed.weight_packed, packed.weight_scale,
                                                            None, 4, GROUP), repeat=3)
                t_aten = best_time(torch_int4_peer(weight, batch)) if peer_ok else float("nan")
            rows.append([f"{out_f}x{in_f}", batch, f"{t_lb * 1e3:.3f}", f"{t_dense * 1e3:.3f}",
                         f"{t_lb / t_dense:.2f}", f"{t_lb / t_ref:.3f}", f"{t_lb / t_aten:.2f}"])
    print("PackedLinear W4A16 g128 (fp32 activations): time and ratio lowbit / peer (below 1 = lowbit faster)")
    print_table(["shape", "batch", "lowbit ms", "fp32 dense ms", "vs dense", "vs reference", "vs aten int4 (bf16)"],
                rows)
    print()

    out_f, in_f = shapes[0]
    w = torch.randn(out_f, in_f)
    packed = lowbit.nn.PackedLinear.from_linear(torch.nn.Linear(in_f, out_f), "W4A16")
    x = torch.randn(1, in_f)
    rows = []
    for name, fn in [("quantize+pack", lambda: quantize_pack_lowbit(w)), ("W4A16 linear batch 1", lambda: packed(x))]:
        times = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                times[n] = best_time(fn)
        rows.append([f"{name} {out_f}x{in_f}", f"{times[1] * 1e3:.2f}", f"{times[2] * 1e3:.2f}", f"{times[1] / times[2]:.2f}x"])
    print("OpenMP scaling (at::parallel_for)")
    print_table(["kernel", "1 thread ms", "2 threads ms", "speedup"], rows)


if __name__ == "__main__":
    main()
