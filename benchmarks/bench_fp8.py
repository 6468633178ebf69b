"""FP8 (E4M3) linear layer speed: lowbit's fp8_linear over fp32 dense F.linear.

    python benchmarks/bench_fp8.py [--isa avx512|avx2|generic] [--layouts channel,block] [--batches 1,2,...]

Weights [out x in] of Llama-7B's Linears in E4M3 with per-channel scales ([out, 1], FP8_DYNAMIC)
or 128x128 block scales (FP8_BLOCK), fp32 activations, both sides timed the same way (fastest of
repeated calls, the two alternated twice) with their weights out of cache: copies are cycled
through 128 MB, as the layers of a model evict each other. One table per ISA path (every path
this CPU supports unless --isa names one), with the bytes of codes read per second at batch 1
and the machine's read bandwidth to compare them with.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

import lowbit

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_time, cold_weights, isa_paths, peer_caps, print_table, read_bandwidth  # noqa: E402

from lowbit import ops  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]
BATCHES = [1, 2, 4, 8, 16, 32, 128, 512]
LAYOUTS = {"channel": lambda n, k: (1, k), "tensor": lambda n, k: (n, k), "block": lambda n, k: (128, 128)}


def repeats(m: int) -> int:
    return 5 if m < 128 else 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", choices=lowbit.cpu.ISAS, help="one ISA path (default: every one this CPU supports)")
    ap.add_argument("--layouts", default="channel,block", help="comma list of channel, tensor, block")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    a = ap.parse_args()
    isas = isa_paths(a.isa)
    layouts = a.layouts.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    torch.manual_seed(0)
    cases = []
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        for layout in layouts:
            block = LAYOUTS[layout](n, k)
            scale = ops.fp8_scales(w, *block)
            cases.append((f"{n}x{k}", layout, w, ops.fp8_quantize(w, scale, *block), scale, block))
    dense = {}  # (shape, batch) -> the fastest dense time seen, across every table
    with torch.inference_mode():
        for isa in isas:
            rows = []
            for name, layout, w, q, scale, block in cases:
                ratios = []
                for m in batches:
                    x = torch.randn(m, w.shape[1])
                    cold_dense = cold_weights(lambda: (lambda w=w.clone(): torch.nn.functional.linear(x, w)),
                                              w.numel() * 4)
                    cold = cold_weights(lambda: (lambda q=q.clone(), s=scale.clone(): ops.fp8_linear(
                        x, q, s, *block, None)), q.numel())
                    # Alternated, fastest of two rounds each: the machine is shared, and a busy spell
                    # then slows both sides alike.
                    t = math.inf
                    for _ in range(2):
                        dense[name, m] = min(dense.get((name, m), math.inf), best_time(cold_dense, repeat=repeats(m)))
                        with lowbit.use_isa(isa):
                            t = min(t, best_time(cold, repeat=repeats(m)))
                    ratios.append(f"{t / dense[name, m]:.2f}x")
                    if m == 1:
                        gbs = f"{q.numel() / t / 1e9:.1f}"
                rows.append([name, layout, *ratios, gbs if 1 in batches else "-"])
            info = lowbit.cpu_info()
            print(f"\nfp8_linear (E4M3) / fp32 F.linear time, {isa} path, {info['cpu']}, "
                  f"{torch.get_num_threads()} threads (weights out of cache; {peer_caps()})", flush=True)
            print_table(["shape [out x in]", "scales", *(f"batch {m}" for m in batches), "GB/s at batch 1"], rows)
    dense_row = [f"{dense[f'{n}x{k}', 1] * 1e3:.2f} ms" for n, k in SHAPES] if 1 in batches else []
    if dense_row:
        print(f"\nfp32 F.linear at batch 1 (cold): {', '.join(f'{n}x{k} {t}' for (n, k), t in zip(SHAPES, dense_row))}")
    print(f"memory read bandwidth (sum over 1 GiB): {read_bandwidth():.1f} GB/s")


if __name__ == "__main__":
    main()
