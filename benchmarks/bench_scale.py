"""Models bigger than memory: a streamed oneshot (stream_weights=True) of synthetic Llama checkpoints
of about 1B, 3B and 8B parameters, each quantized in a fresh process, with its wall time, its CPU
time (all threads; unlike the wall time it leaves out time spent waiting for a busy CPU), peak
RSS (the process's own high-water mark, VmHWM in /proc/self/status) and output size.

    python benchmarks/bench_scale.py [--sizes 1b,3b,8b] [--recipes rtn,gptq] [--samples 128]
                                     [--seq-len 512] [--equal-bytes] [--workdir DIR]

Each checkpoint is made from a Llama config (random N(0, 0.02) weights, bf16, one safetensors
shard per decoder layer plus the index, SmolLM2's tokenizer and vocabulary so that real text
calibrates it) and deleted after its runs. Recipes: RTN W4A16 (no data) and GPTQ W4A16
(`--samples` x `--seq-len` tokens of Austen's Emma, activations spilled to disk). --equal-bytes
also quantizes the smallest size in memory (stream_weights=False) and compares the two checkpoints
file by file.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _decode_models import smollm2_tokenizer  # noqa: E402
from _timing import print_table  # noqa: E402

# name -> Llama config (untied LM head; SmolLM2's vocabulary of 49152)
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}

_CHILD = """
import json, sys, time, torch
import lowbit
from lowbit import examples
torch.set_num_threads(2)
path, out, recipe, samples, seq_len, streaming = sys.argv[1:7]
if recipe == "rtn":
    kwargs = dict(recipe="W4A16", pipeline="datafree")
else:
    kwargs = dict(recipe=lowbit.GPTQModifier(scheme="W4A16", ignore=["lm_head"]),
                  dataset=examples.austen_paragraphs("emma"), num_calibration_samples=int(samples),
                  max_seq_length=int(seq_len), concatenate_data=True, shuffle_calibration_samples=False,
                  activations="disk", spill_dir=sys.argv[7])
t0, cpu0 = time.perf_counter(), time.process_time()
lowbit.oneshot(path, output_dir=out, stream_weights=streaming == "stream", **kwargs)
seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
with open("/proc/self/status") as f:  # this process's own peak (ru_maxrss would include its parent's at fork)
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_kib=peak_kib)))
"""


def make_checkpoint(path: Path, size: str) -> int:
    """A synthetic Llama checkpoint of SIZES[size] at `path`; -> its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    _, tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         dtype="bfloat16", **SIZES[size])
    path.mkdir(parents=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def shards():  # one at a time: the parent stays small
        yield {"model.embed_tokens.weight": randn(config.vocab_size, h)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            yield {p + "self_attn.q_proj.weight": randn(h, h), p + "self_attn.k_proj.weight": randn(kv, h),
                   p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, h),
                   p + "mlp.gate_proj.weight": randn(inter, h), p + "mlp.up_proj.weight": randn(inter, h),
                   p + "mlp.down_proj.weight": randn(h, inter),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        yield {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": randn(config.vocab_size, h)}

    count = config.num_hidden_layers + 2
    weight_map, total, params = {}, 0, 0
    for n, shard in enumerate(shards()):
        name = f"model-{n + 1:05d}-of-{count:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
            params += t.numel()
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return params


def run(path: Path, out: Path, recipe: str, samples: int, seq_len: int, streaming: bool, spill: Path) -> dict:
    """One oneshot in a fresh process: its time, peak RSS and output size."""
    shutil.rmtree(out, ignore_errors=True)
    spill.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(out), recipe, str(samples), str(seq_len),
                             "stream" if streaming else "memory", str(spill)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"})
    stdout, stderr = (out.decode(errors="replace") for out in proc.communicate())
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} on {path} failed (status {proc.returncode}): {(stdout + stderr)[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    # oneshot logs "layer i: n modules in t s": flat per-layer times mean time linear in layers
    layer_seconds = sorted(float(m.group(1)) for m in re.finditer(r"layer \d+: \d+ modules in ([\d.]+) s", stderr))
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    return dict(seconds=result["seconds"], cpu_seconds=result["cpu_seconds"],
                peak_gib=result["peak_kib"] / 2**20, out_gib=size / 2**30,
                layer_median=layer_seconds[len(layer_seconds) // 2],
                layer_spread=layer_seconds[-1] / max(layer_seconds[0], 1e-9))


def same_directories(a: Path, b: Path) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,3b,8b")
    parser.add_argument("--recipes", default="rtn,gptq")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--equal-bytes", action="store_true")
    parser.add_argument("--workdir", default=None, help="where checkpoints are made (default: a temporary directory)")
    args = parser.parse_args()
    import tempfile

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes.split(","):
            path = work / f"llama-{size}"
            shutil.rmtree(path, ignore_errors=True)
            t0 = time.perf_counter()
            params = make_checkpoint(path, size)
            print(f"{size}: {params / 1e9:.2f}B parameters written in {time.perf_counter() - t0:.0f} s", flush=True)
            layers = SIZES[size]["num_hidden_layers"]
            for recipe in args.recipes.split(","):
                r = run(path, work / f"out-{size}-{recipe}", recipe, args.samples, args.seq_len, True, work / "spill")
                data = "-" if recipe == "rtn" else f"{args.samples}x{args.seq_len}"
                rows.append([size, f"{params / 1e9:.2f}", layers, f"{recipe} W4A16", data, f"{r['seconds']:.0f}",
                             f"{r['cpu_seconds']:.0f}", f"{r['layer_median']:.2f} ({r['layer_spread']:.2f}x)",
                             f"{r['peak_gib']:.2f}", f"{r['out_gib']:.2f}"])
                print(rows[-1], flush=True)
                if args.equal_bytes and size == args.sizes.split(",")[0]:
                    m = run(path, work / f"out-{size}-{recipe}-memory", recipe, args.samples, args.seq_len, False,
                            work / "spill")
                    same = same_directories(work / f"out-{size}-{recipe}", work / f"out-{size}-{recipe}-memory")
                    print(f"{size} {recipe}: in memory {m['seconds']:.0f} s, peak RSS {m['peak_gib']:.2f} GiB; "
                          f"streamed checkpoint {'==' if same else '!='} in-memory checkpoint, byte for byte",
                          flush=True)
                    shutil.rmtree(work / f"out-{size}-{recipe}-memory")
                shutil.rmtree(work / f"out-{size}-{recipe}")
            shutil.rmtree(path)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(["size", "params (B)", "layers", "recipe", "calibration", "time (s)", "CPU time (s, both threads)",
                 "s / layer: median (slowest / fastest)", "peak RSS (GiB)", "output (GiB)"], rows)


if __name__ == "__main__":
    main()
