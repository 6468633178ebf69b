"""Data-parallel calibration: GPTQ W4A16 (group 64) on SmolLM2-135M over `--samples` x
`--seq-len` tokens of Austen's Emma, in 1, 2 and 3 processes started by torchrun (gloo), each
process with `--threads` / N threads (at least one). For every run: wall time of the oneshot,
the statistics each rank all-reduced, and how rank 0's model compares with the single
process's: held-out perplexity (20,000 characters of Pride and Prejudice), the largest relative
difference of a weight_scale tensor, and the share of packed int32 words (8 codes each) that
differ.

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
    _, heldout = examples.calibration_and_heldout()
    ppl = lowbit.eval.perplexity(model, heldout[:20000], seq_len=512, tokenizer=examples.load_smollm2()[1])
    print("RESULT " + json.dumps(dict(seconds=seconds, ppl=ppl)))
"""


# Llama-architecture shapes: (hidden, intermediate, layers)
PLAN_MODELS = {"SmolLM2-135M": (576, 1536, 30), "8B": (4096, 14336, 32), "70B": (8192, 28672, 80)}


def hessian_bytes(hidden: int, intermediate: int) -> int:
    """fp32 GPTQ Hessians all-reduced per decoder layer: q/k/v's input, o_proj's, gate/up's
    (hidden^2 each) and down_proj's (intermediate^2)."""
    return 4 * (3 * hidden * hidden + intermediate * intermediate)


def print_plan(gbit: float) -> None:
    """The multi-node plan: what crosses the network per layer, and its time on a ring all-reduce
    (each rank sends and receives about twice the tensor)."""
    rows = []
    for name, (h, i, layers) in PLAN_MODELS.items():
        per_layer = hessian_bytes(h, i)
        rows.append([name, f"{per_layer / 1e9:.3f} GB", f"{per_layer * layers / 1e9:.1f} GB",
                     f"{2 * per_layer / (gbit * 1e9 / 8):.2f} s"])
    print(f"multi-node plan: GPTQ Hessians all-reduced per decoder layer, ring all-reduce at {gbit:g} Gbit/s")
    print_table(["model", "per layer", "whole model", "network time per layer"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,3")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gbit", type=float, default=10.0, help="network speed for the multi-node plan")
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
        result_line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
        seconds, ppl = (json.loads(result_line[7:])[k] for k in ("seconds", "ppl"))
        reduced = [line.split(" of statistics")[0].rsplit(",", 1)[-1].strip() for line in proc.stderr.splitlines()
                   if "of statistics all-reduced" in line]
        state = load_file(str(result))
        if single is None:
            single = state
        scales = [n for n in state if n.endswith("weight_scale")]
        codes = [n for n in state if n.endswith("weight_packed")]
        scale_diff = max(float((state[k].float() - single[k].float()).abs().max() / single[k].float().abs().max())
                         for k in scales)
        code_diff = sum(int((state[k] != single[k]).sum()) for k in codes) / sum(state[k].numel() for k in codes)
        rows.append([n, threads, f"{seconds:.1f}", reduced[0] if reduced else "-", f"{ppl:.3f}", f"{scale_diff:.2e}",
                     f"{100 * code_diff:.3f}%"])
        print(rows[-1], flush=True)
    print(f"GPTQ W4A16 g64, SmolLM2-135M, {args.samples} x {args.seq_len} tokens; torch {torch.__version__}")
    print_table(["processes", "threads each", "oneshot (s)", "all-reduced per rank", "held-out perplexity",
                 "max scale diff vs 1", "packed words differing vs 1"], rows)
    h, i, layers = PLAN_MODELS["SmolLM2-135M"]
    print(f"expected Hessian traffic for SmolLM2-135M: {hessian_bytes(h, i) * layers / 2**20:.1f} MiB")
    print_plan(args.gbit)


if __name__ == "__main__":
    main()
