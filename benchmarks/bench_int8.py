"""LLM.int8() in one run: quality on the real model, then the speed of the int8 matmul.

    python benchmarks/bench_int8.py [--eval-tokens 8192] [--samples 16] [--skip-quality] [--skip-speed]
                                    [--batches 1,2,4,8,16,32,128,512] [--repeat 10]

Quality: held-out perplexity of SmolLM2-135M-Instruct with every Linear but lm_head as
Int8OutlierLinear (oneshot with LLMInt8Modifier, threshold 6.0 (bitsandbytes' default), 3.0,
2.0 and 0 (pure int8)), against the float model,
and the fraction of input dimensions per layer that held an outlier (|x| >= 6) on the
calibration data.

Speed, per ISA path (every path lowbit.supported_isas() lists, through lowbit.use_isa): the
time of Int8OutlierLinear (LLM.int8(), threshold 6.0) and Int8DynamicLinear (W8A8) over fp32
F.linear on the same float weight, at batch 1 to 512 on 7B shapes and SmolLM2's 576x576, with
torch._int_mm on the already-quantized operands (the bare GEMM: no quantization, no
rescaling) as a peer column; then batch 1's weight bytes per second against the machine's read
bandwidth (torch.sum over 1 GiB). Each pair is timed alternately, fastest of repeated calls
(the machines are shared). Activations are Gaussian with 0.1% of the columns planted at 10x,
about LLM.int8()'s outlier rate in large models, so threshold 6.0 decomposes them.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import cold_weights, isa_paths, peer_caps, print_table, read_bandwidth  # noqa: E402

import lowbit  # noqa: E402
from lowbit import examples  # noqa: E402
from lowbit import functional as F  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.nn import Int8DynamicLinear, Int8OutlierLinear  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576)]  # [out, in]
BATCHES = "1,2,4,8,16,32,128,512"


def quality(a):
    model, tokenizer = examples.load_smollm2()
    calibration, heldout = examples.calibration_and_heldout(a.samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[:, : a.eval_tokens]
    base = perplexity(model, ids, seq_len=512)
    rows = [["fp32", f"{base:.3f}", ""]]
    fractions = {}
    for threshold in (6.0, 3.0, 2.0, 0.0):
        model, _ = examples.load_smollm2()
        modifier = lowbit.LLMInt8Modifier(threshold=threshold, ignore=["lm_head"])
        lowbit.oneshot(model, modifier, dataset=calibration, tokenizer=tokenizer)
        ppl = perplexity(model, ids, seq_len=512)
        rows.append([f"LLM.int8(), threshold {threshold:g}", f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}%"])
        fractions = fractions or modifier.outlier_fractions
    print(f"SmolLM2-135M-Instruct, every Linear but lm_head; perplexity on {ids.shape[1]} held-out Pride and "
          f"Prejudice tokens")
    print_table(["weights", "held-out ppl", "vs fp32"], rows)
    by_kind = {}
    for name, f in fractions.items():
        by_kind.setdefault(name.rsplit(".", 1)[1], []).append(f)
    print(f"\noutlier input dimensions (|x| >= 6 in any token) on the calibration data "
          f"({len(fractions)} layers)")
    print_table(["layer", "mean %", "max %", "layers with any"],
                [[k, f"{100 * sum(v) / len(v):.3f}", f"{100 * max(v):.3f}", f"{sum(x > 0 for x in v)} / {len(v)}"]
                 for k, v in sorted(by_kind.items())])
    worst = sorted(fractions.items(), key=lambda kv: -kv[1])[:5]
    print("largest: " + ", ".join(f"{n} {100 * f:.2f}%" for n, f in worst))


def alternate(fns, repeat):
    """Fastest time of each fn, called in turn (a burst of load hits all of them alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def speed(a):
    torch.manual_seed(0)
    batches = [int(b) for b in a.batches.split(",")]
    layers = {}
    for n, k in SHAPES:
        linear = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            linear.weight.normal_(0, 0.02)
        layers[n, k] = (linear.weight.detach(), Int8OutlierLinear.from_linear(linear, 6.0),
                        Int8DynamicLinear.from_linear(linear))
    cpu, threads = lowbit.cpu_info()["cpu"], torch.get_num_threads()
    read = read_bandwidth()
    int_mm = {}
    for isa in isa_paths(int8=True):
        rows, gbs = [], []
        with lowbit.use_isa(isa), torch.inference_mode():
            for (n, k), (w, llm, w8a8) in layers.items():
                outliers = torch.randperm(k)[: max(1, k // 1000)]
                for m in batches:
                    x = torch.randn(m, k)
                    x[:, outliers] *= 10
                    x_codes = F.int8_quantize_rowwise(x).codes
                    repeat = max(3, min(a.repeat, int(2e9 / (m * n * k))))
                    # weights out of cache (copies cycled), as the layers of a model are
                    fns = [cold_weights(lambda: (lambda w=w.clone(): torch.nn.functional.linear(x, w)), n * k * 4),
                           cold_weights(lambda: (lambda c=copy.deepcopy(llm): c(x)), n * k),
                           cold_weights(lambda: (lambda c=copy.deepcopy(w8a8): c(x)), n * k)]
                    if (n, k, m) not in int_mm:  # ATen's: the same on every lowbit path
                        fns.append(lambda: torch._int_mm(x_codes, llm.weight.t()))
                    dense, t_llm, t_w8a8, *t_mm = alternate(fns, repeat)
                    t_mm = int_mm.setdefault((n, k, m), t_mm[0] if t_mm else None)
                    rows.append([f"{n}x{k}", m, f"{dense * 1e3:.3f}", f"{t_llm / dense:.2f}x",
                                 f"{t_w8a8 / dense:.2f}x", f"{t_mm / dense:.2f}x"])
                    if m == 1:
                        gbs.append([f"{n}x{k}", f"{n * k / t_llm / 1e9:.1f}", f"{n * k / t_w8a8 / 1e9:.1f}",
                                    f"{n * k * 4 / dense / 1e9:.1f}"])
        print(f"\n{cpu}, {threads} threads, lowbit path {isa}: time over fp32 F.linear (0.1% outlier columns "
              f"at 10x; {peer_caps()})")
        print_table(["shape [out x in]", "batch", "fp32 dense ms", "LLM.int8() t=6", "W8A8",
                     "torch._int_mm alone"], rows)
        print(f"\nbatch 1 weight GB/s on path {isa} (read bandwidth, torch.sum over 1 GiB: {read:.1f} GB/s)")
        print_table(["shape", "LLM.int8()", "W8A8", "fp32 dense"], gbs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=16, help="calibration paragraphs of Emma (outlier report)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--batches", default=BATCHES, help="comma-separated token counts")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per column (fewer for the largest)")
    a = ap.parse_args()
    if not a.skip_quality:
        quality(a)
    if not a.skip_speed:
        speed(a)


if __name__ == "__main__":
    main()
