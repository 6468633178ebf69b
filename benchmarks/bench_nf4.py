"""NF4 / FP4 on the real model: held-out perplexity and stored size of NF4, FP4 and RTN W4 g64
asymmetric, with and without double quantization, in one run.

    python benchmarks/bench_nf4.py [--eval-tokens 8192]

Every Linear but lm_head is replaced by its quantize -> dequantize round trip (lowbit's C++
kernels, bit for bit bitsandbytes' quantize_4bit for NF4 / FP4), so the perplexity is what
the stored weights compute. Sizes count the quantized Linears' payload (codes + scales, and
for double quantization the 8-bit absmax, nested absmax and offset).
(The fused 4-bit matmul and its speed table are still to come: issue 6.)
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402

from lowbit import examples  # noqa: E402
from lowbit import functional as F  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192)
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
