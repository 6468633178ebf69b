"""W8A8 (dynamic, static, with SmoothQuant, with GPTQ) and FP8 on the real model, lowbit
against llmcompressor 0.14, in one run.

    python benchmarks/bench_w8a8.py [--samples 32] [--seq-len 384] [--eval-tokens 8192] [--only NAME ...]

Same float model (SmolLM2-135M-Instruct saved as safetensors), same calibration paragraphs
(Emma), same recipe in each tool; every oneshot runs in its own process, and every output is
evaluated by the same code (stock transformers + compressed-tensors, which fake-quantizes the
activations as the scheme says) on held-out Pride and Prejudice: perplexity, and KL divergence
from the fp32 model. FP8_BLOCK uses 64 x 64 blocks with 64-column activation groups: the
model's 576 hidden columns rule out the preset's 128. A second table gives the per-channel
activation ranges SmoothQuant works from (how far the largest channel sits above the median).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402
from bench_oneshot import RUNS, run  # noqa: E402

STATIC_W8A8 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                           "input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor",
                                                 "dynamic": False}}}
FP8_BLOCK_64 = {"group_0": {"targets": ["Linear"],
                            "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 64]},
                            "input_activations": {"num_bits": 8, "type": "float", "strategy": "group",
                                                  "group_size": 64, "dynamic": True}}}
FP8_WEIGHT_ONLY = {"group_0": {"targets": ["Linear"],
                               "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}


def quantizer(kind="QuantizationModifier", **kw):
    return [kind, {"targets": "Linear", "ignore": ["lm_head"], **kw}]


def smooth(strength):
    return ["SmoothQuantModifier", {"smoothing_strength": strength}]


SCHEMES = {  # name -> recipe: [modifier class name, kwargs] in order, the same in both tools
    "W8A8 dynamic": [quantizer(scheme="W8A8")],
    "SmoothQuant 0.5 + W8A8": [smooth(0.5), quantizer(scheme="W8A8")],
    "SmoothQuant 0.8 + W8A8": [smooth(0.8), quantizer(scheme="W8A8")],
    "W8A8 static": [quantizer(config_groups=STATIC_W8A8)],
    "SmoothQuant 0.8 + GPTQ W8A8": [smooth(0.8), quantizer("GPTQModifier", scheme="W8A8")],
    "FP8": [quantizer(scheme="FP8")],
    "FP8_DYNAMIC": [quantizer(scheme="FP8_DYNAMIC")],
    "FP8_BLOCK (64x64)": [quantizer(config_groups=FP8_BLOCK_64)],
    "FP8 weight-only": [quantizer(config_groups=FP8_WEIGHT_ONLY)],
}

RUNS["lowbit recipe"] = """
    import lowbit
    model = AutoModelForCausalLM.from_pretrained(args["model"])
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    recipe = [getattr(lowbit, name)(**kw) for name, kw in args["recipe"]]
    t0 = time.perf_counter()
    lowbit.oneshot(model, recipe, dataset=args["texts"], tokenizer=tokenizer, max_seq_length=args["seq_len"],
                   num_calibration_samples=len(args["texts"]), output_dir=args["out"])
    result = {"seconds": time.perf_counter() - t0}
"""

RUNS["llmcompressor recipe"] = """
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    classes = {"GPTQModifier": GPTQModifier, "QuantizationModifier": QuantizationModifier,
               "SmoothQuantModifier": SmoothQuantModifier}
    model = AutoModelForCausalLM.from_pretrained(args["model"])
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    recipe = [classes[name](**kw) for name, kw in args["recipe"]]
    t0 = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=Dataset.from_dict({"text": args["texts"]}), processor=tokenizer,
            max_seq_length=args["seq_len"], num_calibration_samples=len(args["texts"]), output_dir=args["out"])
    result = {"seconds": time.perf_counter() - t0}
"""


def outlier_table(model, tokenizer, texts, seq_len):
    """Per-channel ranges (max - min) of each smoothed norm's output on the calibration text:
    the largest channel over the median, as SmoothQuant sees them."""
    import torch

    from lowbit import functional as F

    ranges = {}

    def hook(name):
        def record(mod, args, out):
            ranges[name] = F.channel_range(out, *ranges.get(name, (None, None)))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n.endswith("layernorm")]
    with torch.inference_mode():
        for t in texts:
            model(**tokenizer(t, return_tensors="pt", truncation=True, max_length=seq_len))
    for h in handles:
        h.remove()
    rows = []
    for name, (lo, hi) in ranges.items():
        r = hi - lo
        rows.append([name.replace("model.layers.", "L"), f"{r.max():.1f}", f"{r.median():.2f}",
                     f"{(r.max() / r.median()):.0f}x", f"{int((r > 10 * r.median()).sum())}"])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32, help="calibration paragraphs of Emma")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--only", nargs="*", help="scheme names to run (default: all)")
    a = ap.parse_args()

    from lowbit import examples

    model, tokenizer = examples.load_smollm2()
    texts, heldout = examples.calibration_and_heldout(a.samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[0, :a.eval_tokens].tolist()
    outliers = outlier_table(model, tokenizer, texts, a.seq_len)
    schemes = {k: v for k, v in SCHEMES.items() if not a.only or k in a.only}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "fp32")
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
        base_ppl = run("evaluate", {"out": base, "ids": ids})["ppl"]
        for name, recipe in schemes.items():
            result = {}
            for tool in ("lowbit", "llmcompressor"):
                out = os.path.join(tmp, f"{tool}-{len(rows)}")
                r = run(f"{tool} recipe", {"model": base, "texts": texts, "seq_len": a.seq_len, "out": out,
                                           "recipe": recipe})
                r.update(run("evaluate", {"out": out, "ids": ids, "base": base}))
                result[tool] = r
            lb, lc = result["lowbit"], result["llmcompressor"]
            rows.append([name, f"{lb['ppl']:.3f}", f"{lc['ppl']:.3f}", f"{lb['kl']:.4f}", f"{lc['kl']:.4f}",
                         f"{lb['seconds']:.1f}", f"{lc['seconds']:.1f}", f"{lb['seconds'] / lc['seconds']:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M-Instruct, {len(texts)} calibration paragraphs x <= {a.seq_len} tokens; held-out perplexity "
          f"on {len(ids)} tokens (fp32 model: {base_ppl:.3f}); KL from fp32 in nats/token on the first 2048")
    print_table(["scheme", "ppl lowbit", "ppl llmcompressor", "KL lowbit", "KL llmcompressor", "oneshot s lowbit",
                 "oneshot s llmcompressor", "time ratio"], rows)
    print("\nActivation ranges SmoothQuant smooths (per channel max - min of each norm's output):")
    print_table(["norm", "largest channel", "median channel", "largest / median", "channels > 10x median"], outliers)


if __name__ == "__main__":
    main()
