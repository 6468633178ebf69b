"""Loading a lowbit W4A16 checkpoint: stock transformers (which decompresses compressed-tensors
checkpoints to dense weights on the CPU) against lowbit.load (packed weights, lowbit's kernels),
each in a fresh interpreter: peak RSS of the process, model.get_memory_footprint(), load time and
one forward's time.

    python benchmarks/bench_load.py [--model smollm2|1b]

The checkpoint (W4A16 group 64, lm_head kept, RTN) is written once under ~/.cache/lowbit/bench/.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _decode_models import cache_dir, log, smollm2, synthetic_1b  # noqa: E402
from _timing import print_table  # noqa: E402

LOADER = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
kind, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if kind == "stock":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
else:
    import lowbit
    model = lowbit.load(path)
load_s = time.perf_counter() - t0
ids = torch.arange(1, 65)[None]
with torch.inference_mode():
    model(input_ids=ids)
    t0 = time.perf_counter()
    model(input_ids=ids[:, :1])
    step_ms = (time.perf_counter() - t0) * 1e3
print(json.dumps({"load_s": load_s, "footprint": model.get_memory_footprint(), "step_ms": step_ms,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "lowbit_imported": "lowbit" in sys.modules}))
"""


def checkpoint(name: str) -> Path:
    import dataclasses

    import lowbit

    out = cache_dir() / f"{name}-W4A16-g64"
    if not (out / "config.json").is_file():
        model = smollm2()[0] if name == "smollm2" else synthetic_1b()[0]
        scheme = lowbit.resolve_scheme("W4A16")
        scheme = dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=64))
        log(f"{name}: writing the W4A16 g64 checkpoint")
        lowbit.oneshot(model, lowbit.QuantizationModifier(scheme=scheme, ignore=["lm_head"]), output_dir=out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "1b"])
    args = ap.parse_args()
    path = checkpoint(args.model)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rows = []
    for kind, label in (("stock", "stock transformers from_pretrained (decompresses)"),
                        ("lowbit", "lowbit.load (packed, lowbit kernels)")):
        proc = subprocess.run([sys.executable, "-c", LOADER, kind, str(path)], capture_output=True, text=True,
                              check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["lowbit_imported"] == (kind == "lowbit")
        rows.append([label, f"{r['peak_rss'] / 2**20:.0f}", f"{r['footprint'] / 2**20:.0f}", f"{r['load_s']:.2f}",
                     f"{r['step_ms']:.1f}"])
    print(f"\n{args.model}: W4A16 g64 checkpoint, {size / 2**20:.1f} MiB of safetensors ({path})")
    print_table(["loader", "peak RSS MiB", "get_memory_footprint MiB", "load s", "1-token step ms (after a "
                 "64-token prefill)"], rows)


if __name__ == "__main__":
    main()
