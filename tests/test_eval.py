"""lowbit.eval: perplexity and KL divergence against hand computations on a tiny Llama,
memory_estimate against hand counts and against the state dict of the packed model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from lowbit.eval import MemoryEstimate, kl_divergence, memory_estimate, perplexity
from lowbit.nn import PackedLinear
from lowbit.schemes import QuantizationArgs, QuantizationScheme

VOCAB = 256


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return LlamaConfig(**{**kw, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def pack_linears(model: nn.Module, scheme) -> nn.Module:
    """Every nn.Linear but lm_head replaced, in place, by its PackedLinear."""
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear.from_linear(linear, scheme))
    return model


def token_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def window_nll(model, ids: torch.Tensor, first: int) -> tuple[float, int]:
    """Summed NLL of tokens first.. of `ids` (one window) from HF's own loss, and their count."""
    labels = ids.clone()
    labels[:first] = -100
    with torch.no_grad():
        loss = model(ids[None], labels=labels[None]).loss.item()
    n = len(ids) - first
    return loss * n, n


# ---------------------------------------------------------------- perplexity


def test_perplexity_one_window_is_exp_hf_loss(model):
    ids = token_ids(40)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert perplexity(model, ids, seq_len=64) == pytest.approx(math.exp(loss), rel=1e-5)
    assert perplexity(model, ids[None], seq_len=64) == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_non_overlapping_windows(model):
    # 50 tokens in windows of 16: [0,16) [16,32) [32,48) [48,50); each window's first token
    # has no context, so 15 + 15 + 15 + 1 tokens are scored.
    ids = token_ids(50)
    parts = [window_nll(model, ids[b:e], 1) for b, e in [(0, 16), (16, 32), (32, 48), (48, 50)]]
    assert sum(n for _, n in parts) == 46
    expected = math.exp(sum(s for s, _ in parts) / 46)
    assert perplexity(model, ids, seq_len=16) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, seq_len=16, stride=16) == perplexity(model, ids, seq_len=16)


def test_perplexity_stride_scores_each_token_once(model):
    # 10 tokens, windows of 6 every 3: [0,6) scores 1..5, [3,9) scores 6..8 (3..5 are
    # context), [6,10) scores 9. Tokens 1..9 each once.
    ids = token_ids(10)
    parts = [window_nll(model, ids[b:e], first - b) for b, e, first in [(0, 6, 1), (3, 9, 6), (6, 10, 9)]]
    assert [n for _, n in parts] == [5, 3, 1]
    expected = math.exp(sum(s for s, _ in parts) / 9)
    assert perplexity(model, ids, seq_len=6, stride=3) == pytest.approx(expected, rel=1e-5)


def test_perplexity_batches_agree(model):
    ids = token_ids(100)
    one = perplexity(model, ids, seq_len=16, stride=8)
    assert perplexity(model, ids, seq_len=16, stride=8, batch_size=4) == pytest.approx(one, rel=1e-5)
    assert perplexity(model, ids, seq_len=16, stride=8, batch_size=64) == pytest.approx(one, rel=1e-5)


def test_perplexity_restores_training_flag(model):
    model.train()
    try:
        perplexity(model, token_ids(20), seq_len=16)
        assert model.training
    finally:
        model.eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_perplexity_text_path(model):
    tok = word_tokenizer()
    texts = ["the cat sat on a mat", "a dog ran on the mat", "the cat ran"]
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 5, 7, 8, 4, 1, 6, 1, 2, 8])
    expected = perplexity(model, ids, seq_len=8)
    assert perplexity(model, texts, seq_len=8, tokenizer=tok) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, "\n\n".join(texts), seq_len=8, tokenizer=tok) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, texts, seq_len=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len"),
    (dict(seq_len=-4), "seq_len"),
    (dict(seq_len=1), "seq_len"),
    (dict(seq_len=8, stride=0), "stride"),
    (dict(seq_len=8, stride=9), "stride"),
    (dict(seq_len=8, batch_size=0), "batch_size"),
])
def test_perplexity_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, token_ids(20), **kwargs)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([5]))
    with pytest.raises(ValueError, match=r"1-D or \[1, N\]"):
        perplexity(model, token_ids(20).view(2, 10))
    with pytest.raises(TypeError, match="integer"):
        perplexity(model, torch.rand(20))
    with pytest.raises(TypeError, match="list of strings"):
        perplexity(model, [])
    with pytest.raises(ValueError, match="causal LM"):
        perplexity(LlamaModel(tiny_config()), token_ids(20), seq_len=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        kl_divergence(model, model, torch.tensor([[5]]))
    with pytest.raises(ValueError, match="causal LM"):
        kl_divergence(model, LlamaModel(tiny_config()), token_ids(20), seq_len=8)
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_divergence(tiny_llama(vocab_size=300), model, token_ids(20), seq_len=8)


# ---------------------------------------------------------------- KL divergence


def test_kl_of_model_with_itself_is_zero(model):
    assert abs(kl_divergence(model, model, token_ids(50), seq_len=16)) < 1e-9


def test_kl_matches_hand_computation(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    ids = token_ids(40)
    with torch.no_grad():
        terms = []
        for b in (0, 16, 32):  # windows [0,16) [16,32) [32,40)
            w = ids[b:b + 16][None]
            base = F.log_softmax(model(w).logits[0].double(), -1)
            quant = F.log_softmax(other(w).logits[0].double(), -1)
            terms.append((base.exp() * (base - quant)).sum(-1))
    expected = torch.cat(terms).mean().item()
    kl = kl_divergence(other, model, ids, seq_len=16)
    assert kl > 0
    assert kl == pytest.approx(expected, rel=1e-9)


def test_quantized_model_evaluates(model):
    quant = pack_linears(copy.deepcopy(model), QuantizationScheme(QuantizationArgs(num_bits=4, group_size=32)))
    ids = token_ids(64)
    base_ppl, quant_ppl = perplexity(model, ids, seq_len=32), perplexity(quant, ids, seq_len=32)
    assert math.isfinite(quant_ppl) and quant_ppl != base_ppl
    assert kl_divergence(quant, model, ids, seq_len=32) > 0


# ---------------------------------------------------------------- memory estimate

# The tiny Llama's Linears per layer as (out, in): q, k, v, o, gate, up, down.
LAYER_LINEARS = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
LINEARS = LAYER_LINEARS * 2
QUANT_PARAMS = sum(o * i for o, i in LINEARS)  # 2 * 36864
EMBED = VOCAB * 64
NORMS = 64 * 5  # two per layer + the final norm
# K and V: 2 layers x 2 kv heads x head_dim 16 x 2048 tokens, fp32.
KV_FP32 = 2 * 2 * 2 * 16 * 2048 * 4


def g(bits, group_size, symmetric=True) -> QuantizationScheme:
    return QuantizationScheme(QuantizationArgs(num_bits=bits, symmetric=symmetric, group_size=group_size))


CHANNEL8 = QuantizationScheme(QuantizationArgs(num_bits=8, strategy="channel", group_size=None))


def test_memory_w4_group32_by_hand(model):
    est = memory_estimate(model, g(4, 32))
    assert QUANT_PARAMS == 73728
    assert est.quantized_params == 73728
    assert est.unquantized_params == 2 * EMBED + NORMS == 33088
    assert est.scale_bytes == 73728 // 32 * 4 == 9216
    assert est.zero_point_bytes == 0
    # packed 4 bits per weight + scales + 14 weight_shape tensors + fp32 embed, lm_head, norms
    assert est.weights_bytes == 73728 // 2 + 9216 + 14 * 16 + 33088 * 4 == 178656
    assert est.kv_cache_bytes == KV_FP32 == 1048576
    assert est.activation_reserve_bytes == math.ceil((178656 + 1048576) / 10)
    assert est.total_bytes == 178656 + 1048576 + est.activation_reserve_bytes


def test_memory_w4_asym_group32_by_hand(model):
    est = memory_estimate(model, g(4, 32, symmetric=False))
    # zero points [out, in/32], int32-packed along out: out * 4 / 32 int32 rows per group
    zero_points = sum(o * 4 // 32 * (i // 32) * 4 for o, i in LINEARS)
    assert zero_points == 73728 // 64 == 1152
    assert est.zero_point_bytes == zero_points
    assert est.weights_bytes == 178656 + 1152


def test_memory_w8_by_hand(model):
    est = memory_estimate(model, g(8, 64))
    scales = sum(o * (i // 64) for o, i in LINEARS) * 4
    assert scales == 73728 // 64 * 4
    assert est.scale_bytes == scales
    assert est.weights_bytes == 73728 + scales + 14 * 16 + 33088 * 4

    est = memory_estimate(model, CHANNEL8)
    assert est.scale_bytes == sum(o for o, _ in LINEARS) * 4 == 1024 * 4
    assert est.weights_bytes == 73728 + 4096 + 14 * 16 + 33088 * 4


def test_memory_dtype_ignore_context_and_tied_embeddings(model):
    est = memory_estimate(model, g(4, 32), dtype=torch.bfloat16, context_length=100, batch_size=3)
    assert est.scale_bytes == 9216 // 2
    assert est.weights_bytes == 73728 // 2 + 4608 + 224 + 33088 * 2
    assert est.kv_cache_bytes == 2 * 2 * 2 * 16 * 100 * 3 * 2
    # lm_head quantized too: it joins the packed weights.
    est = memory_estimate(model, g(4, 32), ignore=())
    assert est.quantized_params == 73728 + EMBED
    assert est.unquantized_params == EMBED + NORMS
    # Tied embeddings are stored once; a quantized lm_head still leaves the embedding whole.
    tied = tiny_llama(tie_word_embeddings=True)
    assert memory_estimate(tied, g(4, 32)).unquantized_params == EMBED + NORMS
    assert memory_estimate(tied, g(4, 32), ignore=()).unquantized_params == EMBED + NORMS
    assert memory_estimate(tied, g(4, 32), ignore="lm_head") == memory_estimate(tied, g(4, 32))


@pytest.mark.parametrize("scheme", [g(4, 32), g(4, 32, symmetric=False), g(8, 64), CHANNEL8, "W4A16"])
@pytest.mark.parametrize("tie", [False, True])
def test_memory_config_and_module_agree(scheme, tie):
    overrides = dict(tie_word_embeddings=tie)
    if scheme == "W4A16":  # group 128 needs in_features divisible by 128
        overrides.update(hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(**overrides))
    assert memory_estimate(tiny_config(**overrides), scheme) == memory_estimate(model, scheme)
    # The config's dtype is the default; the module's is its parameters'.
    bf16 = tiny_config(dtype="bfloat16", **overrides)
    assert memory_estimate(bf16, scheme) == memory_estimate(model.to(torch.bfloat16), scheme)


def state_dict_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("scheme", [g(4, 32), g(4, 32, symmetric=False), g(8, 64), CHANNEL8,
                                    g(3, 32, symmetric=False), g(2, 64)])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_weights_equal_packed_state_dict(scheme, tie, dtype):
    model = tiny_llama(tie_word_embeddings=tie).to(dtype)
    est = memory_estimate(model, scheme)
    pack_linears(model, scheme)
    total = state_dict_bytes(model)
    if not scheme.weights.symmetric:
        # In memory zero points are int8 [out, groups]; on disk int32-packed along out.
        bits = scheme.weights.num_bits
        for name, t in model.state_dict().items():
            if name.endswith("weight_zero_point"):
                out, groups = t.shape
                total += math.ceil(out * bits / 32) * groups * 4 - t.numel()
    assert est.weights_bytes == total


def test_memory_errors(model):
    with pytest.raises(ValueError, match=r"does not divide in_features 64 of 'model\.layers\.0\.self_attn\.q_proj'"):
        memory_estimate(model, "W4A16")  # group 128 > 64
    with pytest.raises(ValueError, match="down_proj"):
        memory_estimate(model, g(4, 48), ignore=[f"model.layers.{i}.{n}" for i in range(2) for n in
                                                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")])
    with pytest.raises(ValueError, match="unknown scheme"):
        memory_estimate(model, "W5A5")
    with pytest.raises(ValueError, match="dtype"):
        memory_estimate(model, g(4, 32), dtype="float33")
    with pytest.raises(ValueError, match="context_length"):
        memory_estimate(model, g(4, 32), context_length=-1)
    with pytest.raises(ValueError, match="batch_size"):
        memory_estimate(model, g(4, 32), batch_size=0)
    with pytest.raises(TypeError, match="PretrainedConfig"):
        memory_estimate({"hidden_size": 64}, g(4, 32))


def test_memory_estimate_str_and_kv_fallbacks(model):
    est = memory_estimate(model, g(4, 32))
    assert isinstance(est, MemoryEstimate)
    text = str(est)
    assert "MiB" in text and "KV cache" in text and "total" in text
    assert f"{est.total_bytes / 2**20:.2f}" in text
    with pytest.raises(AttributeError):
        est.total_bytes = 0  # frozen
    # No config on a plain module: no KV cache; no num_key_value_heads: all heads cache K and V.
    plain = nn.Sequential(nn.Linear(64, 32))
    assert memory_estimate(plain, g(4, 32)).kv_cache_bytes == 0
    mha = tiny_llama()
    mha.config.num_key_value_heads = None
    assert memory_estimate(mha, g(4, 32)).kv_cache_bytes == 2 * KV_FP32
