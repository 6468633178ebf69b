"""Where oneshot keeps the calibration activations between decoder layers (activations=):
peak RSS, time and the resulting weights of a GPTQ W4A16 oneshot on SmolLM2-135M with the
hidden states in memory (fp32), in bf16, and spilled to disk, each in a fresh process.

    python benchmarks/bench_activations.py [--samples 128] [--seq-len 512]

"peak - loading" is the peak RSS above what loading the model took; "weights" says whether the
quantized tensors equal the in-memory run's, byte for byte (a SHA-256 over the checkpoint's
tensors), or how far the scales moved (bf16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_CHILD = """
import hashlib, json, resource, sys, tempfile, time, torch
import lowbit
from lowbit import examples
from safetensors.torch import save_file
from lowbit.formats import compressed_state_dict
torch.set_num_threads(2)
model, tokenizer = examples.load_smollm2()
texts = examples.austen_paragraphs("emma")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
recipe = lowbit.GPTQModifier(config_groups={{"g": {{"targets": ["Linear"], "weights": {{"num_bits": 4, "type": "int",
    "symmetric": True, "strategy": "group", "group_size": 64}}}}}}, ignore=["lm_head"])
with tempfile.TemporaryDirectory() as spill:
    t0 = time.perf_counter()
    lowbit.oneshot(model, recipe, dataset=texts, tokenizer=tokenizer, num_calibration_samples={samples},
                   max_seq_length={seq_len}, concatenate_data=True, shuffle_calibration_samples=False,
                   activations=sys.argv[1],
                   spill_dir=spill)
    seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state = compressed_state_dict(model)
digest = hashlib.sha256()
for name in sorted(state):
    digest.update(name.encode()); digest.update(state[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
scales = {{n: t.float() for n, t in state.items() if n.endswith("weight_scale")}}
save_file(scales, sys.argv[2])
print(json.dumps(dict(seconds=seconds, base=base, peak=peak, sha=digest.hexdigest())))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    code = _CHILD.format(samples=args.samples, seq_len=args.seq_len)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("memory", "bf16", "disk"):
            scales = str(Path(tmp) / f"{mode}.safetensors")
            out = subprocess.run([sys.executable, "-c", code, mode, scales], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode]["scales"] = load_file(scales)
    first = results["memory"]
    rows = []
    for mode, r in results.items():
        if r["sha"] == first["sha"]:
            same = "equal"
        else:
            moved = max(((r["scales"][n] - s).abs().max() / s.abs().max()).item() for n, s in first["scales"].items())
            same = f"differ (scales up to {moved:.2%} of their max)"
        rows.append([mode, f"{r['seconds']:.1f}", f"{r['peak'] / 2**20:.2f}", f"{(r['peak'] - r['base']) / 2**20:.2f}",
                     same])
    hidden = 576 * 4 * args.samples * args.seq_len / 2**30
    print(f"GPTQ W4A16 g64 oneshot, SmolLM2-135M fp32, {args.samples} samples x {args.seq_len} tokens (Emma, "
          f"concatenated; {hidden:.2f} GiB per set of fp32 hidden states, three sets alive), peak RSS in GiB")
    print_table(["activations", "seconds", "peak RSS", "peak - loading", "weights vs memory"], rows)


if __name__ == "__main__":
    main()
