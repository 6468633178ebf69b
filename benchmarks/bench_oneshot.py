"""RTN W4A16 oneshot on the real model with lowbit and with llmcompressor, side by side.

    python benchmarks/bench_oneshot.py [--samples 64] [--eval-tokens 8192]

Same float model (SmolLM2-135M-Instruct, saved once as safetensors), same recipe (int4
symmetric, group 64: its 576 hidden columns rule out 128), same calibration paragraphs.
Each run happens in its own process, so peak RSS is that run's alone; each output is then
evaluated by the same code (stock transformers + compressed-tensors) on held-out text.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402

CONFIG_GROUPS = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}

PRELUDE = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = json.loads(sys.argv[1])
    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
""")

RUNS = {
    "load only": """
        model = AutoModelForCausalLM.from_pretrained(args["model"])
        result = {"seconds": 0.0}
    """,
    "lowbit": """
        import lowbit
        from lowbit import modifiers
        model = AutoModelForCausalLM.from_pretrained(args["model"])
        tokenizer = AutoTokenizer.from_pretrained(args["model"])
        modifier = getattr(modifiers, args.get("modifier", "QuantizationModifier"))
        recipe = [modifier(config_groups=args["config_groups"], ignore=["lm_head"], **args.get("kwargs", {}))]
        if "awq" in args:
            recipe.insert(0, modifiers.AWQModifier(**args["awq"]))
        t0 = time.perf_counter()
        lowbit.oneshot(model, recipe,
                       dataset=args["texts"] if args["with_data"] else None, tokenizer=tokenizer,
                       max_seq_length=args["seq_len"], num_calibration_samples=len(args["texts"]), output_dir=args["out"])
        result = {"seconds": time.perf_counter() - t0}
    """,
    "llmcompressor": """
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        model = AutoModelForCausalLM.from_pretrained(args["model"])
        tokenizer = AutoTokenizer.from_pretrained(args["model"])
        modifier = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier}[
            args.get("modifier", "QuantizationModifier")]
        recipe = [modifier(config_groups=args["config_groups"], ignore=["lm_head"], **args.get("kwargs", {}))]
        if "awq" in args:
            from llmcompressor.modifiers.transform.awq import AWQModifier
            from llmcompressor.pipelines.cache import IntermediatesCache
            # llmcompressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies,
            # which raises on a CPU-only torch; pinning changes nothing else, so skip it.
            IntermediatesCache.pin_memory = lambda self, *a, **k: None
            recipe.insert(0, AWQModifier(**args["awq"]))
        t0 = time.perf_counter()
        oneshot(model=model, recipe=recipe,
                dataset=Dataset.from_dict({"text": args["texts"]}), processor=tokenizer,
                max_seq_length=args["seq_len"], num_calibration_samples=len(args["texts"]), output_dir=args["out"])
        result = {"seconds": time.perf_counter() - t0}
    """,
    "evaluate": """
        from lowbit.eval import kl_divergence, perplexity
        model = AutoModelForCausalLM.from_pretrained(args["out"]).eval()
        ids = torch.tensor(args["ids"])[None]
        result = {"ppl": perplexity(model, ids, seq_len=512)}
        if args.get("base"):
            base = AutoModelForCausalLM.from_pretrained(args["base"]).eval()
            result["kl"] = kl_divergence(model, base, ids[:, :2048], seq_len=512)
    """,
}


def run(kind: str, args: dict) -> dict:
    code = PRELUDE + textwrap.dedent(RUNS[kind]) + "\nresult['peak_mib'] = peak_mib()\nprint('RESULT', json.dumps(result))\n"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64, help="calibration paragraphs of Emma")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens of Pride and Prejudice")
    a = ap.parse_args()

    from lowbit import examples

    model, tokenizer = examples.load_smollm2()
    texts, heldout = examples.calibration_and_heldout(a.samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[0, : a.eval_tokens].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "fp32")
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
        common = {"model": base, "texts": texts, "seq_len": a.seq_len, "config_groups": CONFIG_GROUPS}
        results = {"load only": run("load only", common)}
        for tool, kind, with_data in (("lowbit", "lowbit", True), ("lowbit, no data", "lowbit", False),
                                      ("llmcompressor", "llmcompressor", True)):
            out = os.path.join(tmp, tool.replace(", ", "-").replace(" ", "-"))
            results[tool] = run(kind, {**common, "out": out, "with_data": with_data})
            quality = run("evaluate", {"out": out, "ids": ids, "base": base})
            results[tool].update(ppl=quality["ppl"], kl=quality["kl"])  # peak RSS stays the oneshot run's
        base_ppl = run("evaluate", {"out": base, "ids": ids})["ppl"]

    print(f"RTN W4A16 (int4 sym, group 64) on SmolLM2-135M-Instruct, {len(texts)} calibration paragraphs x "
          f"<= {a.seq_len} tokens; perplexity on {len(ids)} held-out tokens (fp32 model: {base_ppl:.3f})\n")
    lb, lc = results["lowbit"], results["llmcompressor"]
    rows = [[tool, f"{r['seconds']:.2f}", f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['peak_mib']:.0f}"]
            for tool, r in results.items() if tool != "load only"]
    rows.append(["lowbit / llmcompressor", f"{lb['seconds'] / lc['seconds']:.2f}x", f"{lb['ppl'] / lc['ppl']:.4f}x", "", ""])
    print_table(["tool", "oneshot + save s", "held-out ppl", "KL vs fp32 (nats/token)", "peak RSS MiB"], rows)
    print("(lowbit with data also measures each layer's output error on a few samples; llmcompressor's RTN "
          "runs no forward pass)")
    load = results["load only"]["peak_mib"]
    print(f"\npeak RSS: loading the model alone {load:.0f} MiB; loading + lowbit oneshot + save {lb['peak_mib']:.0f} MiB "
          f"({lb['peak_mib'] - load:+.0f} MiB: oneshot adds one layer's outputs and the calibration activations)")


if __name__ == "__main__":
    main()
