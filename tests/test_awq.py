"""AWQ: the C++ statistics, scale-loss and clip kernels against lowbit.reference.awq, the
search, exact folding on tiny Llama / Qwen2 / Mistral models, AWQModifier in oneshot and
recipes, and bad inputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

import lowbit
from lowbit import functional as F
from lowbit import ops
from lowbit.modifiers.awq import AWQModifier
from lowbit.reference import awq as R

from conftest import DTYPE_IDS, FLOAT_DTYPES, noncontig, rand_weight

# Every kernel test runs on each ISA path this CPU supports (AVX-512, AVX2, portable).
pytestmark = pytest.mark.usefixtures("isa_path")

DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)


def activations(tokens, cols, gen):
    """Inputs with per-channel magnitudes spread over two decades, as real activations have."""
    return torch.randn(tokens, cols, generator=gen) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=gen)]


def gram_of(x):
    x = x.float()
    return x.t() @ x


# -- statistics -----------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (2, 5, 513), (3, 1000)])
def test_channel_stats_match_reference(gen, dtype, shape):
    x = torch.randn(*shape, generator=gen).to(dtype)
    acc, n = F.awq_channel_stats(x)
    ref, ref_n = R.channel_stats(x)
    assert n == ref_n and acc.dtype == torch.float64
    torch.testing.assert_close(acc, ref, rtol=1e-12, atol=0)


def test_channel_stats_stream_and_noncontiguous(gen):
    x = torch.randn(64, 96, generator=gen)
    acc, n = F.awq_channel_stats(noncontig(x[:40]))
    acc, n = F.awq_channel_stats(noncontig(x[40:], "transpose"), acc, n)
    ref, _ = R.channel_stats(x)
    assert n == 64
    torch.testing.assert_close(acc, ref, rtol=1e-12, atol=0)


# -- scale loss -----------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("rows,cols,group_size", [(37, 96, 32), (1, 64, 64), (70, 192, 64), (33, 128, 128)])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False), (8, True), (2, False)])
def test_scale_loss_matches_reference(gen, dtype, rows, cols, group_size, bits, symmetric):
    w = rand_weight(rows, cols, dtype, gen)
    g = gram_of(activations(200, cols, gen))
    s = torch.rand(cols, generator=gen) * 2 + 0.25
    got = ops.awq_scale_loss(w, ops.awq_gram_factor(g), s, bits, group_size, symmetric)
    ref = R.scale_loss(w, g, s, bits, group_size, symmetric)
    assert got == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("how", ["slice", "transpose"])
def test_scale_loss_noncontiguous_inputs(gen, how):
    w = rand_weight(40, 128, torch.float32, gen)
    g = gram_of(activations(300, 128, gen))
    s = torch.rand(128, generator=gen) + 0.5
    factor = ops.awq_gram_factor(g)
    ref = ops.awq_scale_loss(w, factor, s, 4, 64, False)
    assert ops.awq_scale_loss(noncontig(w, how), noncontig(factor, how), s, 4, 64, False) == pytest.approx(ref, rel=1e-6)


def test_gram_factor(gen):
    x = activations(300, 96, gen)
    g = gram_of(x)
    factor = ops.awq_gram_factor(g)
    assert torch.equal(factor, factor.tril())
    torch.testing.assert_close(factor @ factor.t(), g, rtol=1e-4, atol=1e-4 * g.diagonal().mean().item())
    # fewer tokens than columns, and a dead channel: singular, jittered, still a usable factor
    singular = gram_of(torch.cat([x[:40, :95], torch.zeros(40, 1)], 1))
    factor = ops.awq_gram_factor(singular)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.t(), singular, rtol=0, atol=1e-4 * singular.diagonal().mean().item())
    assert torch.isnan(ops.awq_gram_factor(torch.full((8, 8), float("nan")))).all()


def test_gram_loss_is_the_output_error(gen):
    """sum((D G) * D) with G = X^T X is ||X D^T||^2, the balance layers' output error."""
    w = rand_weight(48, 128, torch.float32, gen)
    x = activations(500, 128, gen)
    s = torch.rand(128, generator=gen) + 0.5
    q = R._group_fake_quant(w * s, 4, 64, False, w.dtype) / s
    direct = (x.double() @ (w - q).double().t()).pow(2).sum().item()
    assert ops.awq_scale_loss(w, ops.awq_gram_factor(gram_of(x)), s, 4, 64, False) == pytest.approx(direct, rel=1e-4)


# -- search ---------------------------------------------------------------------------------

@pytest.mark.parametrize("duo_scaling", [True, False])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, False), (4, 32, True), (3, 64, False)])
def test_search_matches_reference(gen, duo_scaling, bits, group_size, symmetric):
    cols = 192
    w = rand_weight(96, cols, torch.float32, gen)
    x = activations(400, cols, gen)
    x_mean = x.abs().mean(0)
    got = F.awq_search(w, gram_of(x), x_mean, bits=bits, group_size=group_size, symmetric=symmetric,
                       duo_scaling=duo_scaling)
    scales, ratio, duo, losses = R.search(w, gram_of(x), x_mean, bits, group_size, symmetric, duo_scaling)
    assert (got.ratio, got.duo_scaling) == (ratio, duo)
    torch.testing.assert_close(got.scales, scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(losses), rtol=1e-4, atol=0)
    assert min(got.losses) <= got.identity_loss  # the grid holds a point at least as good as no scaling


def test_search_beats_identity_on_salient_channels(gen):
    """A few channels with large activations: scaling them up (AWQ's point) lowers the error."""
    cols = 256
    w = rand_weight(128, cols, torch.float32, gen)
    x = torch.randn(512, cols, generator=gen)
    x[:, :4] *= 50
    got = F.awq_search(w, gram_of(x), x.abs().mean(0), bits=4, group_size=64)
    assert got.ratio > 0 and min(got.losses) < 0.9 * got.identity_loss
    assert got.scales[:4].min() > got.scales[4:].max()


def test_grid_follows_llmcompressor():
    assert F.awq_grid(True, 20)[:3] == [(0.0, False), (0.0, True), (1 / 18, True)] and len(F.awq_grid(True, 20)) == 20
    assert F.awq_grid(False, 5) == [(0.0, False), (0.25, False), (0.5, False), (0.75, False), (1.0, False)]
    assert F.awq_grid("both", 4) == [(0.0, False), (0.0, True), (1.0, False), (1.0, True)]


# -- clip -----------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("rows,cols,group_size,bits,symmetric", [
    (37, 96, 32, 4, False), (64, 128, 64, 4, True), (5, 256, 128, 3, False), (16, 64, 64, 8, True)])
def test_clip_matches_reference(gen, dtype, rows, cols, group_size, bits, symmetric):
    w = rand_weight(rows, cols, dtype, gen)
    g = gram_of(activations(300, cols, gen))
    got = F.awq_clip(w, g, bits=bits, group_size=group_size, symmetric=symmetric)
    ref = R.clip(w, g, bits, group_size, symmetric)
    assert got.shape == (rows, cols // group_size)
    # Equal bounds, except where two shrink factors score the same up to float rounding.
    differ = got != ref
    assert differ.float().mean() <= 0.02
    for r, grp in differ.nonzero().tolist():
        err = [_group_error(w, g, r, grp, b, bits, group_size, symmetric) for b in (got[r, grp], ref[r, grp])]
        assert err[0] == pytest.approx(err[1], rel=1e-4)


def _group_error(w, g, r, grp, bound, bits, gs, symmetric):
    sl = slice(grp * gs, (grp + 1) * gs)
    x = w[r:r + 1, sl].float()
    c = x.clamp(-float(bound), float(bound))
    d = x - R._group_fake_quant(c, bits, gs, symmetric, w.dtype)
    return (d @ g[sl, sl] @ d.t()).item()


def test_clip_lowers_the_output_error(gen):
    w = rand_weight(64, 256, torch.float32, gen)
    x = activations(500, 256, gen)
    g = gram_of(x)
    bound = F.awq_clip(w, g, bits=4, group_size=64)
    clipped = torch.minimum(torch.maximum(w, -bound.repeat_interleave(64, 1)), bound.repeat_interleave(64, 1))
    def err(v):
        return (x @ (w - F.fake_quantize(v, 4, False, "group", 64)).t()).pow(2).sum()
    assert (bound <= w.reshape(64, 4, 64).abs().amax(-1)).all()
    assert err(clipped) < err(w)


# -- folding and the modifier ---------------------------------------------------------------

def tiny(kind, kv_heads):
    common = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads)
    torch.manual_seed(0)
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                "mistral": (MistralForCausalLM, MistralConfig)}[kind]
    model = cls(cfg(**common)).eval()
    with torch.no_grad():  # non-trivial norms, as trained models have
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)
    return model


def transform_only(model, ids, quantizer=None, **kwargs):
    """Run AWQModifier's statistics and transform on every decoder layer, without quantizing
    (the search uses `quantizer`'s scheme, default W4A16_ASYM)."""
    awq = AWQModifier(**kwargs)
    quantizer = quantizer or lowbit.QuantizationModifier(scheme="W4A16_ASYM", ignore=["lm_head"])
    plan = quantizer.plan(model)
    names = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    awq.prepare(model, names, plan)
    hooks = [h for n, layer in zip(names, model.model.layers) for h in awq.layer_hooks(n, layer, plan)]
    with torch.inference_mode():
        model(ids)
        for h in hooks:
            h.remove()
        for n, layer in zip(names, model.model.layers):
            awq.transform_layer(n, layer, plan)
    return awq


@pytest.mark.parametrize("kind,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2), ("mistral", 4)])
def test_folding_is_exact(kind, kv_heads):
    model = tiny(kind, kv_heads)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    awq = transform_only(model, ids, clip=False)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-4
    # every layer's four mappings, but v_proj -> o_proj only without grouped-query attention
    smooth = {n.split(".", 3)[-1] for n in awq.chosen}
    expected = {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"} | (
        {"self_attn.v_proj"} if kv_heads == 4 else set())
    assert smooth == expected and len(awq.chosen) == 2 * len(expected)
    assert any(r > 0 for r, _ in awq.chosen.values())  # the scales did change the model


def test_clip_changes_only_non_qk_weights():
    model = tiny("llama", 4)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    transform_only(ref, ids, clip=False)
    transform_only(model, ids, clip=True)
    changed = {n.split(".", 3)[-1] for n, p in model.named_parameters()
               if not torch.equal(p, dict(ref.named_parameters())[n])}
    assert changed and not changed & {"self_attn.q_proj.weight", "self_attn.k_proj.weight"}
    assert changed <= {"self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                       "mlp.up_proj.weight", "mlp.down_proj.weight"}


TEXTS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(8)]


def test_oneshot_awq_one_and_two_modifier_forms_agree(tmp_path):
    ids = [torch.tensor([[b % 128 for b in t.encode()]]) for t in TEXTS]
    a, b = tiny("llama", 2), tiny("llama", 2)
    lowbit.oneshot(a, [AWQModifier(), lowbit.QuantizationModifier(scheme="W4A16_ASYM", ignore=["lm_head"])],
                   dataset=ids, output_dir=tmp_path / "a")
    lowbit.oneshot(b, AWQModifier(scheme="W4A16_ASYM", targets="Linear", ignore=["lm_head"]), dataset=ids,
                   output_dir=tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "AWQModifier" in (tmp_path / "a" / "recipe.yaml").read_text()


def test_oneshot_awq_alone_quantizes_w4a16_asym_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = [torch.tensor([[b % 128 for b in t.encode()]]) for t in TEXTS]
    model = tiny("qwen2", 2)
    base = copy.deepcopy(model)
    lowbit.oneshot(model, AWQModifier(n_grid=10), dataset=ids, output_dir=tmp_path)
    args = model.config.quantization_config["config_groups"]["group_0"]["weights"]
    assert args["num_bits"] == 4 and not args["symmetric"] and args["group_size"] == 128
    probe = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(3))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        ours, theirs, fp = model(probe).logits, reloaded(probe).logits, base(probe).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (ours - fp).abs().max() < fp.abs().max()  # quantized, not broken


def test_yaml_recipe_with_mappings():
    recipe = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      duo_scaling: both
      n_grid: 10
      mappings:
        - smooth_layer: "re:.*post_attention_layernorm$"
          balance_layers: ["re:.*gate_proj$", "re:.*up_proj$"]
    QuantizationModifier:
      scheme: W4A16_ASYM
      targets: [Linear]
      ignore: [lm_head]
"""
    mods = lowbit.parse_recipe(recipe)
    assert [type(m).__name__ for m in mods] == ["AWQModifier", "QuantizationModifier"]
    assert mods[0].duo_scaling == "both" and mods[0].mappings[0].balance_layers == ["re:.*gate_proj$", "re:.*up_proj$"]
    ids = [torch.tensor([[b % 128 for b in t.encode()]]) for t in TEXTS]
    lowbit.oneshot(tiny("llama", 4), mods, dataset=ids)
    assert set(k.split(".", 3)[-1] for k in mods[0].chosen) == {"post_attention_layernorm"}


# -- bad inputs -----------------------------------------------------------------------------

def test_unknown_architecture_says_how_to_pass_mappings():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=128, n_head=2, vocab_size=128)).eval()
    ids = [torch.tensor([[1, 2, 3, 4]])]
    with pytest.raises(ValueError, match="no default mappings for GPT2LMHeadModel.*mappings=.*smooth_layer"):
        lowbit.oneshot(model, AWQModifier(scheme="W4A16_ASYM", ignore=["lm_head"]), dataset=ids)


def test_mapping_that_matches_nothing():
    ids = [torch.tensor([[1, 2, 3, 4]])]
    with pytest.raises(ValueError, match="match no"):
        lowbit.oneshot(tiny("llama", 4), AWQModifier(mappings=[{"smooth_layer": "re:.*ln_1$",
                                                               "balance_layers": ["re:.*c_attn$"]}]), dataset=ids)


def test_bad_arguments():
    with pytest.raises(ValueError, match="duo_scaling"):
        AWQModifier(duo_scaling="yes")
    with pytest.raises(ValueError, match="n_grid"):
        AWQModifier(n_grid=1)
    with pytest.raises(ValueError, match="max_shrink"):
        AWQModifier(max_shrink=1.0)
    with pytest.raises(ValueError, match="AWQ mapping must be"):
        AWQModifier(mappings=["re:.*q_proj"])
    # AWQ with GPTQ (llmcompressor's quantization_multiple_modifiers.py): both run, no default
    # quantization added (GPTQ quantizes)
    assert [type(m).__name__ for m in lowbit.parse_recipe([AWQModifier(), lowbit.GPTQModifier(scheme="W4A16")])] \
        == ["AWQModifier", "GPTQModifier"]
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.oneshot(tiny("llama", 4), AWQModifier())


def test_zero_and_nan_statistics_give_finite_scales(gen):
    w = rand_weight(32, 128, torch.float32, gen)
    g = gram_of(activations(200, 128, gen))
    zeros = torch.zeros(128)
    nan = torch.full((128,), float("nan"))
    for x_mean in (zeros, nan, torch.cat([zeros[:64], torch.ones(64)])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = F.awq_search(w, g, x_mean, bits=4, group_size=64)
        assert torch.isfinite(result.scales).all() and result.scales.min() > 0


def test_no_finite_loss_falls_back_to_identity(gen):
    w = rand_weight(32, 128, torch.float32, gen)
    g = torch.full((128, 128), float("nan"))
    with pytest.warns(UserWarning, match="identity scales"):
        result = F.awq_search(w, g, torch.rand(128, generator=gen), bits=4, group_size=64)
    assert torch.equal(result.scales, torch.ones(128)) and result.ratio == -1


def test_functional_bad_shapes(gen):
    w = rand_weight(32, 128, torch.float32, gen)
    with pytest.raises(ValueError, match="gram must be"):
        F.awq_search(w, torch.eye(64), torch.ones(128))
    with pytest.raises(ValueError, match="x_mean must be"):
        F.awq_search(w, torch.eye(128), torch.ones(64))
    with pytest.raises(ValueError, match="group_size 96 does not divide"):
        F.awq_clip(w, torch.eye(128), group_size=96)
    with pytest.raises(ValueError, match="empty"):
        F.awq_channel_stats(torch.empty(0, 8))
