"""GPTQ: the C++ solve and Hessian against their peers, and oneshot GPTQ on the real model
against llmcompressor's GPTQ (and RTN), in one run.

    python benchmarks/bench_gptq.py [--quick] [--configs w4-sym w4-asym w3 w8]

Peers: lowbit.reference.gptq (the pure-PyTorch transcription with a Python loop per
column), `x.T @ x` for the Hessian, llmcompressor 0.14's oneshot with the same model,
calibration paragraphs, sequence length and recipe. SmolLM2's 576 hidden columns rule out
group 128, so the grouped configs use group 64.
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
from lowbit.reference import gptq as R  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]

CONFIGS = {
    "w4-sym": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
    "w4-asym": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
    "w3": {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
    "w8": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None},
}


def correlated_inputs(tokens, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)


def kernels(shapes):
    rows = []
    for out_f, in_f in shapes:
        x = correlated_inputs(2048, in_f)
        w = torch.randn(out_f, in_f) * 0.02
        acc = torch.zeros(in_f, in_f)
        t_stream = best_time(lambda: F.hessian(x, acc, 2048, mirror=False), repeat=3)  # one batch of a stream
        t_h = best_time(lambda: F.hessian(x), repeat=3)  # a whole Hessian from one batch, mirrored
        t_xx = best_time(lambda: (x.t() @ x) * (2.0 / x.shape[0]), repeat=3)
        h, _ = F.hessian(x)
        t_solve = best_time(lambda: F.gptq(w, h, bits=4, group_size=128), repeat=1, warmup=1, min_seconds=0)
        t_ref = best_time(lambda: R.gptq(w, h, bits=4, group_size=128, symmetric=True, actorder="static"),
                          repeat=1, warmup=0, min_seconds=0)
        rows.append([f"{out_f}x{in_f}", f"{t_solve:.2f}", f"{t_ref:.2f}", f"{t_solve / t_ref:.2f}",
                     f"{t_xx * 1e3:.0f}", f"{t_stream * 1e3:.0f}", f"{t_stream / t_xx:.2f}", f"{t_h * 1e3:.0f}",
                     f"{t_h / t_xx:.2f}"])
    print("GPTQ kernels, W4 g128 static act-order (2048 calibration tokens): time and ratio lowbit / peer.\n"
          "Hessian: one batch added to a running accumulator (upper triangle, as oneshot streams it), and\n"
          "a whole Hessian from one batch, mirrored, both against x.T @ x")
    print_table(["shape", "solve s", "reference s", "ratio", "x.T @ x ms", "stream ms", "ratio", "whole ms",
                 "ratio"], rows)
    print()


def oneshot(configs, samples, seq_len, eval_tokens):
    from lowbit import examples

    model, tokenizer = examples.load_smollm2()
    texts, heldout = examples.calibration_and_heldout(samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[0, :eval_tokens].tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "fp32")
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
        base_ppl = run("evaluate", {"out": base, "ids": ids})["ppl"]
        for name in configs:
            common = {"model": base, "texts": texts, "seq_len": seq_len, "with_data": True,
                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": CONFIGS[name]}}}
            result = {}
            for label, kind, modifier in (("RTN (lowbit)", "lowbit", "QuantizationModifier"),
                                          ("GPTQ lowbit", "lowbit", "GPTQModifier"),
                                          ("GPTQ llmcompressor", "llmcompressor", "GPTQModifier")):
                out = os.path.join(tmp, f"{name}-{kind}-{modifier}")
                result[label] = run(kind, {**common, "out": out, "modifier": modifier})
                result[label]["ppl"] = run("evaluate", {"out": out, "ids": ids})["ppl"]
            lb, lc = result["GPTQ lowbit"], result["GPTQ llmcompressor"]
            rows.append([name, f"{result['RTN (lowbit)']['ppl']:.3f}", f"{lb['ppl']:.3f}", f"{lc['ppl']:.3f}",
                         f"{lb['seconds']:.0f}", f"{lc['seconds']:.0f}", f"{lb['seconds'] / lc['seconds']:.2f}"])
    print(f"oneshot on SmolLM2-135M-Instruct: {len(texts)} Emma paragraphs x <= {seq_len} tokens; held-out "
          f"perplexity on {len(ids)} Pride and Prejudice tokens (fp32: {base_ppl:.3f})")
    print_table(["config", "RTN ppl", "GPTQ lowbit ppl", "GPTQ llmcompressor ppl", "lowbit s", "llmcompressor s",
                 "time ratio"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first kernel shape only")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--skip-kernels", action="store_true")
    a = ap.parse_args()
    if not a.skip_kernels:
        kernels(SHAPES[:1] if a.quick else SHAPES)
    if a.configs:
        oneshot(a.configs, a.samples, a.seq_len, a.eval_tokens)


if __name__ == "__main__":
    main()
