"""KV-cache quantization on the real model (SmolLM2-135M-Instruct): the cache's measured size at
a 4k-token context and held-out perplexity at that context, for W4A16 weights with the cache in
fp32, FP8 E4M3 (per tensor, per KV head) and int8 (per KV head).

    python benchmarks/bench_kv_cache.py [--context 4096] [--samples 32]

Calibration: Pride and Prejudice paragraphs; perplexity: held-out text of the same package
(lowbit.examples.calibration_and_heldout), in windows of --context tokens.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import lowbit
from lowbit import examples
from lowbit.eval import memory_estimate, perplexity

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402

WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
KV = {"fp32 (no kv_cache_scheme)": None,
      "FP8 E4M3, per tensor": {"num_bits": 8, "type": "float", "strategy": "tensor"},
      "FP8 E4M3, per KV head": {"num_bits": 8, "type": "float", "strategy": "attn_head"},
      "int8, per KV head": {"num_bits": 8, "type": "int", "strategy": "attn_head"}}


def cache_bytes(model, ids) -> int:
    """Bytes the cache holds after one forward over `ids` (its key and value tensors)."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tokenizer = examples.load_smollm2()
    calibration, heldout = examples.calibration_and_heldout(num_calibration=args.samples,
                                                            heldout_chars=args.context * 10)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[:, :2 * args.context]
    print(f"SmolLM2-135M-Instruct, W4A16 g64 weights (RTN), {args.samples} calibration paragraphs, perplexity over "
          f"{ids.shape[1]} held-out tokens in {args.context}-token windows, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    with torch.inference_mode():
        fp32_ppl = perplexity(base, ids, seq_len=args.context)
    rows = [["fp32 model, fp32 cache", "-", f"{cache_bytes(base, ids[:, :args.context]) / 2**20:.1f}", "-",
             f"{fp32_ppl:.3f}", "-"]]
    for name, kv in KV.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        lowbit.oneshot(model, lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"],
                                                                             "weights": WEIGHTS}},
                                                          ignore=["lm_head"], kv_cache_scheme=kv),
                       dataset=calibration, tokenizer=tokenizer, max_seq_length=512)
        seconds = time.perf_counter() - t0
        estimate = memory_estimate(base, {"weights": WEIGHTS}, context_length=args.context, kv_cache_scheme=kv)
        with torch.inference_mode():
            ppl = perplexity(model, ids, seq_len=args.context)
        if kv is None:
            fp32_cache_ppl = ppl
        rows.append([f"W4A16, cache {name}", f"{seconds:.1f}",
                     f"{cache_bytes(model, ids[:, :args.context]) / 2**20:.1f}",
                     f"{estimate.kv_cache_bytes / 2**20:.1f}", f"{ppl:.3f}", f"{ppl - fp32_cache_ppl:+.3f}"])
    print_table(["setup", "oneshot s", f"KV cache at {args.context} tokens, measured MiB", "memory_estimate MiB",
                 f"perplexity @ {args.context}", "change vs the fp32 cache"], rows)


if __name__ == "__main__":
    main()
