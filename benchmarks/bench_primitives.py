"""Foundation benchmark: quantize+pack throughput and the packed W4A16 / W8A16 linear on every
ISA path, each as a ratio against a peer timed in the same run.

    python benchmarks/bench_primitives.py [--quick] [--isa avx2,generic]

Peers: lowbit.reference (pure PyTorch), fp32 dense F.linear (MKL), and torch's own CPU int4
kernel aten._weight_int4pack_mm_for_cpu (bf16 activations, its fastest mode here). On a CPU with
bf16 arithmetic, also bf16 activations over many tokens against bf16 dense F.linear.
"""

import argparse
import contextlib
import copy
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit import functional as LF
from lowbit import reference as R

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_time, cold_weights, isa_paths, peer_caps, print_table, read_bandwidth  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]
SMALL = (576, 576)  # SmolLM2-135M's attention projections: the fixed cost per call
BATCHES = (1, 2, 4, 8, 16, 32, 128, 512)
GROUP = 128
PEER_OK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


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
    ap.add_argument("--quick", action="store_true", help="first shape only, batches 1 and 16")
    ap.add_argument("--isa", help="comma list of ISA paths to time (default: LOWBIT_ISA's, else every one this CPU supports)")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    torch.manual_seed(0)
    info = lowbit.cpu_info()
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, threads {torch.get_num_threads()}, "
          f"CPU {info['cpu']} (best path {info['detected']}; paths timed: {', '.join(isa_paths(args.isa))}; {peer_caps()})\n")

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

    bandwidth = read_bandwidth()
    print(f"measured read bandwidth (torch.sum over 1 GiB, {torch.get_num_threads()} threads): {bandwidth:.1f} GB/s\n")
    isas = isa_paths(args.isa)
    batches = (1, 16) if args.quick else BATCHES
    linear_shapes = shapes + [SMALL]
    for scheme in ("W4A16", "W8A16"):
        rows = []
        for out_f, in_f in linear_shapes:
            group = GROUP if in_f % GROUP == 0 else 64
            linear = torch.nn.Linear(in_f, out_f, bias=False)
            packed = lowbit.nn.PackedLinear.from_linear(linear, scheme_with_group(scheme, group))
            weight_bytes = sum(t.numel() * t.element_size() for t in (packed.weight_packed, packed.weight_scale))
            for batch in batches if scheme == "W4A16" else (1, 16):
                x = torch.randn(batch, in_f)
                repeat = 3 if batch >= 128 else 10
                dense = cold_weights(lambda: (lambda w=linear.weight.detach().clone(): F.linear(x, w)),
                                     linear.weight.numel() * 4)
                modules = cold_weights(lambda: (lambda m=copy.deepcopy(packed): m(x)), weight_bytes)
                with torch.inference_mode():
                    t_dense = best_time(dense, repeat=repeat)
                    row = [f"{out_f}x{in_f}", batch, f"{t_dense * 1e3:.3f}"]
                    for isa in isas:
                        with lowbit.use_isa(isa):
                            t = best_time(modules, repeat=repeat)
                        row += [f"{t / t_dense:.2f}", f"{weight_bytes / t / 1e9:.1f}" if batch == 1 else ""]
                    if batch in (1, 16) and scheme == "W4A16" and in_f % GROUP == 0 and PEER_OK:
                        row.append(f"{best_time(torch_int4_peer(linear.weight.detach(), batch)) / t_dense:.2f}")
                    else:
                        row.append("")
                rows.append(row)
        headers = ["shape", "batch", "fp32 dense ms"]
        for isa in isas:
            headers += [f"{isa} / dense", f"{isa} GB/s (b1)"]
        headers.append("aten int4 (bf16) / dense")
        print(f"PackedLinear {scheme} g{GROUP} (g64 for 576 columns), fp32 activations: time / fp32 F.linear time "
              "(below 1 = lowbit faster), both with their weights out of cache (copies cycled, as the layers of a "
              "model are); GB/s = packed weight + scale bytes read per second at batch 1")
        print_table(headers, rows)
        print()

    if lowbit.cpu_info()["bf16_gemm"] and "avx512" in isas:
        bf16_prefill(shapes, (128,) if args.quick else (32, 128, 512))

    out_f, in_f = shapes[1] if len(shapes) > 1 else shapes[0]
    w = torch.randn(out_f, in_f)
    packed = lowbit.nn.PackedLinear.from_linear(torch.nn.Linear(in_f, out_f), "W4A16")
    x = torch.randn(1, in_f)
    rows = []
    threads = torch.get_num_threads()
    jobs = [("quantize+pack", None, lambda: quantize_pack_lowbit(w))]
    jobs += [(f"W4A16 linear batch 1 [{isa}]", isa, lambda: packed(x)) for isa in isas]
    for name, isa, fn in jobs:
        times = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode(), (lowbit.use_isa(isa) if isa else contextlib.nullcontext()):
                times[n] = best_time(fn)
        rows.append([f"{name} {out_f}x{in_f}", f"{times[1] * 1e3:.2f}", f"{times[2] * 1e3:.2f}", f"{times[1] / times[2]:.2f}x"])
    torch.set_num_threads(threads)
    print("OpenMP scaling (at::parallel_for)")
    print_table(["kernel", "1 thread ms", "2 threads ms", "speedup"], rows)


def bf16_prefill(shapes, batches):
    """bf16 activations over many tokens on a CPU with bf16 arithmetic: PackedLinear multiplies
    bf16 tiles (cpu_info()["bf16_gemm"]); peers: bf16 and fp32 dense F.linear, and the same
    layer's fp32-activation path."""
    rows = []
    for out_f, in_f in shapes:
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        packed = lowbit.nn.PackedLinear.from_linear(linear, "W4A16")
        packed16 = lowbit.nn.PackedLinear.from_linear(copy.deepcopy(linear).to(torch.bfloat16), "W4A16")
        w16 = linear.weight.detach().to(torch.bfloat16)
        for batch in batches:
            x = torch.randn(batch, in_f)
            x16 = x.to(torch.bfloat16)
            with torch.inference_mode(), lowbit.use_isa("avx512"):
                t16 = best_time(lambda: packed16(x16), repeat=3)
                t32 = best_time(lambda: packed(x), repeat=3)
                dense16 = best_time(lambda: F.linear(x16, w16), repeat=3)
                dense32 = best_time(lambda: F.linear(x, linear.weight), repeat=3)
            rows.append([f"{out_f}x{in_f}", batch, f"{t16 * 1e3:.2f}", f"{t16 / dense16:.2f}", f"{t16 / dense32:.2f}",
                         f"{t16 / t32:.2f}"])
    print("PackedLinear W4A16 g128 with bf16 activations, avx512 path (bf16 GEMM on decoded tiles): time over bf16 "
          "dense F.linear, fp32 dense F.linear, and the same layer on fp32 activations (weights in cache)")
    print_table(["shape", "batch", "bf16 ms", "/ bf16 dense", "/ fp32 dense", "/ fp32 activations"], rows)
    print()


def scheme_with_group(name, group):
    scheme = lowbit.resolve_scheme(name)
    return dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=group))


if __name__ == "__main__":
    main()
