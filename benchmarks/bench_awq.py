"""AWQ: the C++ scale-loss and clip kernels against the pure-PyTorch reference, and oneshot
AWQ on the real model against llmcompressor's AWQ (and RTN, GPTQ), in one run.

    python benchmarks/bench_awq.py [--samples 32] [--seq-len 384] [--skip-kernels]

W4 asymmetric, group 64 (SmolLM2's 576 hidden columns rule out 128). Each oneshot runs in its
own process with the same float model, calibration paragraphs, sequence length and
quantization modifier; every output is evaluated by the same code (stock transformers +
compressed-tensors) on held-out text. llmcompressor 0.14's AWQ scores each grid point by
running the parent module (self_attn, mlp) over every cached sample; lowbit's scores the
balance layers' output error through the Gram matrix of their input.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_time, print_table  # noqa: E402
from bench_oneshot import run  # noqa: E402

from lowbit import functional as F  # noqa: E402
from lowbit import ops  # noqa: E402
from lowbit.reference import awq as R  # noqa: E402

W4_G64_ASYM = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}}}
# [rows, cols] of a 7B Llama's balance groups: q/k/v, gate/up, down_proj
SHAPES = [(3 * 4096, 4096), (2 * 11008, 4096), (4096, 11008)]


def kernels(shapes):
    rows = []
    for out_f, in_f in shapes:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        x = torch.randn(2048, in_f, generator=g) * torch.logspace(-1, 1, in_f)
        gram = x.t() @ x
        s = torch.rand(in_f, generator=g) + 0.5
        factor = ops.awq_gram_factor(gram)  # once per balance group, shared by its grid points
        t_loss = best_time(lambda: ops.awq_scale_loss(w, factor, s, 4, 128, False), repeat=1, min_seconds=0)
        t_ref = best_time(lambda: R.scale_loss(w, gram, s, 4, 128, False), repeat=1, min_seconds=0)
        t_mm = best_time(lambda: w @ gram, repeat=1, min_seconds=0)
        sub = w[:1024]  # the reference clip loops over groups in Python: a slice keeps it short
        t_clip = best_time(lambda: F.awq_clip(sub, gram, bits=4, group_size=128), repeat=1, min_seconds=0)
        t_clip_ref = best_time(lambda: R.clip(sub, gram, 4, 128, False), repeat=1, warmup=0, min_seconds=0)
        rows.append([f"{out_f}x{in_f}", f"{t_loss * 1e3:.0f}", f"{t_ref * 1e3:.0f}", f"{t_loss / t_ref:.2f}",
                     f"{t_mm * 1e3:.0f}", f"{t_loss / t_mm:.2f}", f"{t_clip * 1e3:.0f}", f"{t_clip_ref * 1e3:.0f}",
                     f"{t_clip / t_clip_ref:.2f}"])
    print("AWQ kernels, W4 g128 asymmetric: one grid point's loss (D = W - Q(W s)/s, ||D L||^2 with G = L L^T) against\n"
          "the reference (sum((D G) * D)) and against the bare GEMM W @ G; the clip search on 1024 rows against the\n"
          "reference")
    print_table(["shape", "loss ms", "reference ms", "ratio", "W @ G ms", "ratio", "clip ms", "reference ms",
                 "ratio"], rows)
    print()


def oneshot(samples, seq_len, eval_tokens):
    from lowbit import examples

    model, tokenizer = examples.load_smollm2()
    texts, heldout = examples.calibration_and_heldout(samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[0, :eval_tokens].tolist()
    runs = [  # label, tool, modifier, AWQ arguments
        ("RTN", "lowbit", "QuantizationModifier", None),
        ("AWQ lowbit", "lowbit", "QuantizationModifier", {}),
        ("AWQ lowbit, no clip", "lowbit", "QuantizationModifier", {"clip": False}),
        ("AWQ llmcompressor 0.14", "llmcompressor", "QuantizationModifier", {}),
        ("GPTQ lowbit", "lowbit", "GPTQModifier", None),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "fp32")
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
        base_ppl = run("evaluate", {"out": base, "ids": ids})["ppl"]
        for label, tool, modifier, awq in runs:
            out = os.path.join(tmp, label.replace(" ", "-").replace(",", ""))
            args = {"model": base, "texts": texts, "seq_len": seq_len, "with_data": True,
                    "config_groups": W4_G64_ASYM, "out": out, "modifier": modifier}
            if awq is not None:
                args["awq"] = awq
            results[label] = run(tool, args)
            results[label]["ppl"] = run("evaluate", {"out": out, "ids": ids})["ppl"]
    ref = results["AWQ llmcompressor 0.14"]["seconds"]
    print(f"oneshot W4 g64 asymmetric on SmolLM2-135M-Instruct: {len(texts)} Emma paragraphs x <= {seq_len} tokens; "
          f"held-out perplexity on {len(ids)} Pride and Prejudice tokens (fp32: {base_ppl:.3f})")
    print_table(["method", "held-out ppl", "oneshot + save s", "time / llmcompressor AWQ", "peak RSS MiB"],
                [[label, f"{r['ppl']:.3f}", f"{r['seconds']:.1f}", f"{r['seconds'] / ref:.2f}",
                  f"{r['peak_mib']:.0f}"] for label, r in results.items()])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32, help="calibration paragraphs of Emma")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-oneshot", action="store_true")
    a = ap.parse_args()
    if not a.skip_kernels:
        kernels(SHAPES)
    if not a.skip_oneshot:
        oneshot(a.samples, a.seq_len, a.eval_tokens)


if __name__ == "__main__":
    main()
