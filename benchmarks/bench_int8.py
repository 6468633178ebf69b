"""LLM.int8() in one run: quality on the real model, then the speed of the int8 matmul.

    python benchmarks/bench_int8.py [--eval-tokens 8192] [--samples 16] [--skip-quality] [--skip-speed]

Quality: held-out perplexity of SmolLM2-135M-Instruct with every Linear but lm_head as
Int8OutlierLinear (oneshot with LLMInt8Modifier, threshold 6.0 (bitsandbytes' default), 3.0,
2.0 and 0 (pure int8)), against the float model,
and the fraction of input dimensions per layer that held an outlier (|x| >= 6) on the
calibration data.

Speed: lowbit's int8_outlier_matmul (activations quantized per token, outlier columns in
floating point, int8 x int8 -> int32) at batch 1, 16 and 128 on 7B shapes, against fp32 dense
F.linear, bitsandbytes' Linear8bitLt on the CPU (its own int8 quantization in PyTorch and
torch._int_mm) and torch._int_mm on the already-quantized operands (the bare GEMM, no
quantization or rescaling), all timed the same way (fastest of
repeated calls). Activations are Gaussian with 0.1% of the columns planted at 10x, about
LLM.int8()'s outlier rate in large models, so threshold 6.0 decomposes them.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_time, print_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit import examples  # noqa: E402
from lowbit import functional as F  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]  # [out, in]
BATCHES = [1, 16, 128]


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


def bnb_linear(w, threshold):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").eval()  # .to() quantizes


def speed():
    torch.manual_seed(0)
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        codes, scb, _ = F.int8_quantize_rowwise(w)
        bnb6, bnb0 = bnb_linear(w, 6.0), bnb_linear(w, 0.0)
        outliers = torch.randperm(k)[: max(1, k // 1000)]
        for m in BATCHES:
            x = torch.randn(m, k)
            x[:, outliers] *= 10
            x_codes = F.int8_quantize_rowwise(x).codes
            with torch.inference_mode():
                t = {"t6": best_time(lambda: F.int8_outlier_matmul(x, codes, scb, 6.0)),
                     "t0": best_time(lambda: F.int8_outlier_matmul(x, codes, scb, 0.0)),
                     "dense": best_time(lambda: torch.nn.functional.linear(x, w)),
                     "bnb6": best_time(lambda: bnb6(x), repeat=5),
                     "bnb0": best_time(lambda: bnb0(x), repeat=5)}
                t["int_mm"] = best_time(lambda: torch._int_mm(x_codes, codes.t()))
            int_mm = f"{t['int_mm'] * 1e3:.2f} ms ({t['t0'] / t['int_mm']:.2f}x)"
            rows.append([f"{n}x{k}", m, f"{t['t6'] * 1e3:.2f}", f"{t['t6'] / t['dense']:.2f}x",
                         f"{t['t0'] / t['dense']:.2f}x", f"{t['t6'] / t['bnb6']:.2f}x", f"{t['t0'] / t['bnb0']:.2f}x",
                         int_mm, f"{t['dense'] * 1e3:.2f}", f"{t['bnb6'] * 1e3:.2f}"])
    print(f"\nLLM.int8() matmul ({torch.get_num_threads()} threads; 0.1% outlier columns at 10x); ratios are "
          "lowbit's time over the peer's")
    print_table(["shape [out x in]", "batch", "lowbit t=6 ms", "t=6 vs fp32 dense", "t=0 vs fp32 dense",
                 "t=6 vs bitsandbytes", "t=0 vs bitsandbytes", "torch._int_mm alone (lowbit t=0 vs it)",
                 "dense ms", "bitsandbytes t=6 ms"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=16, help="calibration paragraphs of Emma (outlier report)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    if not a.skip_quality:
        quality(a)
    if not a.skip_speed:
        speed()


if __name__ == "__main__":
    main()
