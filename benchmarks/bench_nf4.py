"""NF4 / FP4 in one run: quality on the real model, then the speed of the fused 4-bit matmul.

    python benchmarks/bench_nf4.py [--eval-tokens 8192] [--skip-quality] [--skip-speed] [--skip-isa-tables]

Quality: held-out perplexity and stored size of NF4, FP4 and RTN W4 g64 asymmetric, with and
without double quantization. Every Linear but lm_head is replaced by its quantize ->
dequantize round trip (lowbit's C++ kernels, bit for bit bitsandbytes' quantize_4bit for NF4 /
FP4), so the perplexity is what the stored weights compute. Sizes count the quantized
Linears' payload (codes + scales, and for double quantization the 8-bit absmax, nested absmax
and offset).

Speed: lowbit's nf4_linear (blocksize 64, fp32 activations) at batch 1 and 16 on 7B shapes,
against fp32 dense F.linear, dequantize-then-matmul in PyTorch (the pure-PyTorch reference
decode + F.linear) and bitsandbytes' Linear4bit on the CPU, all timed the same way (fastest
of repeated calls). The machine's 300 MB L3 keeps a 4-bit weight (8-23 MB) cached between
calls, so "warm" figures run from cache; "cold" ones evict the caches (a 1 GiB write) before
every call, as a real model's layers do to each other. Achieved bandwidth = bytes of codes
and scales read / time, beside a measured copy bandwidth (bytes read + written / time).

Per ISA path (lowbit.supported_isas() but avxvnni, each forced with lowbit.use_isa): NF4Linear's time over
fp32 F.linear at batch 1 to 512 on the three shapes and 576x576, GB/s at batch 1, and the
machine's read bandwidth (a sum over 1 GiB) to compare it with.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import lowbit

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_time, cold_weights, isa_paths, peer_caps, print_table, read_bandwidth  # noqa: E402

from lowbit import examples  # noqa: E402
from lowbit import functional as F  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.reference import nf4 as reference  # noqa: E402


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def round_trip(w, method):
    """(the weight the stored format computes with, its payload in bytes)."""
    if method == "rtn":
        codes, scale, zero = F.quantize(w, bits=4, symmetric=False, strategy="group", group_size=64)
        return F.dequantize(codes, scale, zero).to(w.dtype), codes.numel() // 2 + nbytes(scale) + zero.numel() // 2
    quant_type, double_quant = method
    packed, state = F.nf4_quantize(w, 64, quant_type, double_quant=double_quant)
    return F.nf4_dequantize(packed, state), nbytes(packed, state.absmax, state.nested_absmax, state.offset)


def quality(a):
    model, tokenizer = examples.load_smollm2()
    _, heldout = examples.calibration_and_heldout(1)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[:, : a.eval_tokens]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    params = sum(w.numel() for w in originals.values())
    rows = [["fp32", f"{perplexity(model, ids, seq_len=512):.3f}", f"{params * 4 / 2**20:.1f}", "32"]]
    for label, method in (("RTN int4 g64 asym", "rtn"), ("NF4 b64", ("nf4", False)), ("NF4 b64 + double quant", ("nf4", True)),
                          ("FP4 b64", ("fp4", False)), ("FP4 b64 + double quant", ("fp4", True))):
        size = 0
        with torch.no_grad():
            for n, m in linears.items():
                w, b = round_trip(originals[n], method)
                m.weight.copy_(w)
                size += b
        rows.append([label, f"{perplexity(model, ids, seq_len=512):.3f}", f"{size / 2**20:.1f}",
                     f"{size * 8 / params:.3f}"])
    print(f"SmolLM2-135M-Instruct, the {len(linears)} Linears but lm_head ({params / 1e6:.1f}M parameters); "
          f"perplexity on {ids.shape[1]} held-out Pride and Prejudice tokens")
    print_table(["weights", "held-out ppl", "Linear payload MiB", "bits / parameter"], rows)


SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in] of Llama-7B's Linears
BATCHES = [1, 16]
ISA_BATCHES = [1, 2, 4, 8, 16, 32, 128, 512]
_EVICT = torch.empty(2**28)  # 1 GiB, written before each cold call


def cold_time(fn, repeat: int = 5) -> float:
    """Fastest of `repeat` calls, each after evicting the caches."""
    times = []
    for _ in range(repeat):
        _EVICT.fill_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(nbytes: int, timer) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src)) / 1e9


def bnb_linear(w, quant_type="nf4"):
    """bitsandbytes' Linear4bit holding w, as transformers' load_in_4bit builds it on the CPU."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, blocksize=64)
    # .to() quantizes; in eval mode the first call repacks the weight for bitsandbytes' own
    # CPU kernel (bfloat16 activations on AVX512-BF16 CPUs), as in transformers' inference
    return layer.to("cpu").eval()


def speed():
    torch.manual_seed(0)
    rows, cold_rows = [], []
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        packed, state = F.nf4_quantize(w, 64, "nf4")
        packed_dq, state_dq = F.nf4_quantize(w, 64, "nf4", double_quant=True)
        payload = packed.numel() + state.absmax.numel() * 4
        bnb = bnb_linear(w)

        def dequant_then_matmul(x):
            weight = reference.dequantize(packed, state.absmax, 64, "nf4", (n, k), torch.float32)
            return torch.nn.functional.linear(x, weight)

        for m in BATCHES:
            x = torch.randn(m, k)
            with torch.inference_mode():
                bnb(x)  # the first call repacks
                t = {"lowbit": best_time(lambda: F.nf4_linear(x, packed, state)),
                     "lowbit_dq": best_time(lambda: F.nf4_linear(x, packed_dq, state_dq)),
                     "dense": best_time(lambda: torch.nn.functional.linear(x, w)),
                     "torch": best_time(lambda: dequant_then_matmul(x), repeat=3),
                     "bnb": best_time(lambda: bnb(x), repeat=3)}
                if m == 1:
                    cold = {"lowbit": cold_time(lambda: F.nf4_linear(x, packed, state)),
                            "dense": cold_time(lambda: torch.nn.functional.linear(x, w))}
            rows.append([f"{n}x{k}", m, f"{t['lowbit'] * 1e3:.2f}", f"{t['lowbit'] / t['dense']:.2f}x",
                         f"{t['lowbit_dq'] / t['dense']:.2f}x", f"{t['lowbit'] / t['torch']:.3f}x",
                         f"{t['lowbit'] / t['bnb']:.3f}x", f"{t['dense'] * 1e3:.2f}", f"{t['torch'] * 1e3:.1f}",
                         f"{t['bnb'] * 1e3:.1f}", f"{payload / t['lowbit'] / 1e9:.1f}"])
            if m == 1:
                cold_rows.append([f"{n}x{k}", f"{cold['lowbit'] * 1e3:.2f}", f"{cold['dense'] * 1e3:.2f}",
                                  f"{cold['lowbit'] / cold['dense']:.2f}x", f"{payload / cold['lowbit'] / 1e9:.1f}",
                                  f"{n * k * 4 / cold['dense'] / 1e9:.1f}"])
    print(f"\nfused NF4 matmul (blocksize 64, fp32 activations, {torch.get_num_threads()} threads), warm; "
          "ratios are lowbit's time over the peer's")
    print_table(["shape [out x in]", "batch", "lowbit ms", "vs fp32 dense", "NF4+DQ vs dense",
                 "vs dequant+matmul (PyTorch)", "vs bitsandbytes", "dense ms", "dequant+matmul ms", "bitsandbytes ms",
                 "lowbit GB/s"], rows)
    print("\nbatch 1, cold (caches evicted before every call)")
    print_table(["shape [out x in]", "lowbit ms", "dense ms", "lowbit vs dense", "lowbit GB/s", "dense GB/s"],
                cold_rows)
    print(f"\ncopy bandwidth (read + write): 1 GiB buffers {copy_bandwidth(2**30, cold_time):.1f} GB/s (memory), "
          f"16 MiB buffers {copy_bandwidth(2**24, best_time):.1f} GB/s (cache)")


def isa_tables():
    """Per ISA path: NF4Linear (blocksize 64, fp32 activations) time over fp32 F.linear at every
    batch size, and the NF4 payload bytes read per second at batch 1; both with their weights out of
    cache (copies cycled, as the layers of a model are)."""
    from lowbit.nn import NF4Linear

    torch.manual_seed(0)
    cases = []
    for n, k in SHAPES + [(576, 576)]:
        linear = torch.nn.Linear(k, n, bias=False)
        module = NF4Linear.from_linear(linear)
        payload = nbytes(module.weight, module.absmax)
        cases.append((f"{n}x{k}", linear.weight.detach(), module, payload))
    dense = {}
    with torch.inference_mode():
        for name, w, _, _ in cases:
            for m in ISA_BATCHES:
                x = torch.randn(m, w.shape[1])
                cold = cold_weights(lambda: (lambda w=w.clone(): torch.nn.functional.linear(x, w)), w.numel() * 4)
                dense[name, m] = best_time(cold, repeat=5 if m < 128 else 3)
        for isa in isa_paths():
            rows = []
            with lowbit.use_isa(isa):
                for name, w, module, payload in cases:
                    ratios = []
                    for m in ISA_BATCHES:
                        x = torch.randn(m, w.shape[1])
                        cold = cold_weights(lambda: (lambda c=copy.deepcopy(module): c(x)), payload)
                        t = best_time(cold, repeat=5 if m < 128 else 3)
                        ratios.append(f"{t / dense[name, m]:.2f}x")
                        if m == 1:
                            gbs = payload / t / 1e9
                    rows.append([name, *ratios, f"{gbs:.1f}"])
            print(f"\nNF4Linear / fp32 F.linear time, {isa} path, {lowbit.cpu_info()['cpu']}, "
                  f"{torch.get_num_threads()} threads (weights out of cache; {peer_caps()})")
            print_table(["shape [out x in]", *(f"batch {m}" for m in ISA_BATCHES), "GB/s at batch 1"], rows)
    print(f"\nmemory read bandwidth (sum over 1 GiB): {read_bandwidth():.1f} GB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-isa-tables", action="store_true")
    a = ap.parse_args()
    if not a.skip_quality:
        quality(a)
    if not a.skip_speed:
        speed()
    if not a.skip_isa_tables:
        isa_tables()


if __name__ == "__main__":
    main()
