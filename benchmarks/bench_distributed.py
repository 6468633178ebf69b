"""Data-parallel calibration: GPTQ W4A16 (group 64) on SmolLM2-135M over `--samples` x
`--seq-len` tokens of Austen's Emma, in 1, 2 and 3 processes started by torchrun (gloo), each
process with `--threads` / N threads (at least one). For every run: wall time of the oneshot,
the statistics each rank all-reduced, and how far rank 0's weights are from the single
process's: the largest relative difference of a weight_scale tensor and the share of packed
codes that differ.

    python benchmarks/bench_distributed.py [--procs 1,2,3] [--samples 32] [--seq-len 512] [--threads 2]

On one machine the processes share its cores, so this shows the cost of the reductions and
that the results agree; the speed-up belongs to several machines (README: multi-node).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table  # noqa: E402

_RANK = """
import json, os, sys, time, torch
import lowbit
from lowbit import examples
from lowbit.formats import compressed_state_dict
from safetensors.torch import save_file
torch.set_num_threads(int(sys.argv[4]))
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
recipe = lowbit.GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
    "symmetric": True, "strategy": "group", "group_size": 64}}}, ignore=["lm_head"])
t0 = time.perf_counter()
lowbit.oneshot(model, recipe, dataset=examples.austen_paragraphs("emma"), num_calibration_samples=int(sys.argv[2]),
               max_seq_length=int(sys.argv[3]), concatenate_data=True, shuffle_calibration_samples=False)
seconds = time.perf_counter() - t0
if int(os.environ.get("RANK", "0")) == 0:
    save_file(compressed_state_dict(model), sys.argv[5])
    print("RESULT " + json.dumps(dict(seconds=seconds)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,3")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from lowbit import examples

    work = Path(tempfile.mkdtemp(prefix="lowbit-dist-"))
    model, tokenizer = examples.load_smollm2()
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model
    script = work / "rank.py"
    script.write_text(_RANK)
    rows, single = [], None
    for n in [int(p) for p in args.procs.split(",")]:
        threads = max(1, args.threads // n)
        result = work / f"result-{n}.safetensors"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(script), str(work / "model"), str(args.samples), str(args.seq_len), str(threads), str(result)]
        proc = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"{n} processes failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        seconds = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])["seconds"]
        reduced = [line.split("statistics")[0].rsplit(",", 1)[-1].strip() for line in proc.stderr.splitlines()
                   if "of statistics all-reduced" in line]
        state = load_file(str(result))
        if single is None:
            single = state
        scales = [n for n in state if n.endswith("weight_scale")]
        codes = [n for n in state if n.endswith("weight_packed")]
        scale_diff = max(float((state[k].float() - single[k].float()).abs().max() / single[k].float().abs().max())
                         for k in scales)
        code_diff = sum(int((state[k] != single[k]).sum()) for k in codes) / sum(state[k].numel() for k in codes)
        rows.append([n, threads, f"{seconds:.1f}", reduced[0] if reduced else "-", f"{scale_diff:.2e}",
                     f"{100 * code_diff:.3f}%"])
        print(rows[-1], flush=True)
    print(f"GPTQ W4A16 g64, SmolLM2-135M, {args.samples} x {args.seq_len} tokens; torch {torch.__version__}")
    print_table(["processes", "threads each", "oneshot (s)", "all-reduced per rank", "max scale diff vs 1",
                 "packed words differing vs 1"], rows)


if __name__ == "__main__":
    main()
