"""The `lowbit` command line."""

from __future__ import annotations

import argparse
import time


def demo(args: argparse.Namespace) -> None:
    """RTN W4A16 on a tiny random-initialised Llama: size before/after and output error."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit

    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.inference_mode():
        reference = model(ids).logits
    before, params = lowbit.nn.model_bytes(model), sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    n = lowbit.nn.quantize_linears_(model, args.scheme, ignore=["lm_head"])
    seconds = time.perf_counter() - start
    after = lowbit.nn.model_bytes(model)
    with torch.inference_mode():
        logits = model(ids).logits
    rel = ((logits - reference).norm() / reference.norm()).item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"tiny random Llama ({params / 1e6:.1f}M parameters), "
          f"{args.scheme}: {n} Linear layers quantized in {seconds:.2f} s")
    print(f"size:   {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({before / after:.2f}x smaller; "
          f"embeddings and lm_head stay fp32)")
    print(f"output: relative logit error {rel:.4f}, top-1 agreement {agree:.1%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training quantization for HF language models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="quantize a tiny random Llama and report size and error")
    p.add_argument("--scheme", default="W4A16", help="preset scheme (W4A16, W4A16_ASYM, W8A16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
