"""AWQ on the real model (SmolLM2-135M-Instruct) and real text (Emma, Pride and Prejudice): the
C++ search and clip against the reference on captured activations, exact folding, and AWQ's
held-out perplexity below RTN's. A few short samples keep it quick; bench_awq.py runs full size."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit import examples
from lowbit import functional as F
from lowbit.eval import perplexity
from lowbit.reference import awq as R

from conftest import capture_inputs

# The inputs of three balance groups: q/k/v (after input_layernorm), gate/up, down_proj.
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.7.mlp.gate_proj", "model.layers.20.mlp.down_proj"]
W4_G64_ASYM = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}}}


@pytest.fixture(scope="module")
def texts():
    calibration, heldout = examples.calibration_and_heldout(num_calibration=8)
    return calibration, heldout


@pytest.fixture(scope="module")
def captured(smollm2, texts):
    """Each layer in LAYERS: (its fp32 weight, the inputs it saw on the calibration paragraphs)."""
    return capture_inputs(smollm2, texts[0], LAYERS)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("duo_scaling,symmetric", [(True, False), (False, True)])
def test_search_and_clip_match_reference_on_real_activations(captured, name, duo_scaling, symmetric):
    w, x = captured[name]
    gram, _ = F.hessian(x)
    stats, n = F.awq_channel_stats(x)
    ref_stats, _ = R.channel_stats(x)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)
    x_mean = (stats / n).float()
    got = F.awq_search(w, gram, x_mean, bits=4, group_size=64, symmetric=symmetric, duo_scaling=duo_scaling)
    scales, ratio, duo, losses = R.search(w, gram, x_mean, 4, 64, symmetric, duo_scaling)
    assert (got.ratio, got.duo_scaling) == (ratio, duo)
    torch.testing.assert_close(got.scales, scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(losses), rtol=1e-4, atol=0)

    scaled, g = w * got.scales, gram / (got.scales[:, None] * got.scales[None, :])
    bound = F.awq_clip(scaled, g, bits=4, group_size=64, symmetric=symmetric)
    ref = R.clip(scaled, g, 4, 64, symmetric)
    assert (bound != ref).float().mean() <= 0.01  # near-ties of the error may pick a neighbour


@pytest.fixture(scope="module")
def heldout_ids(smollm2, texts):
    return smollm2[1](texts[1], return_tensors="pt").input_ids[:, :1024]


def test_folding_is_exact_on_the_real_model(smollm2, texts, heldout_ids):
    from test_awq import transform_only

    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    ids = tokenizer(texts[0][0], return_tensors="pt", truncation=True, max_length=128).input_ids
    with torch.inference_mode():
        before = model(heldout_ids[:, :256]).logits
        awq = transform_only(model, ids, lowbit.QuantizationModifier(config_groups=W4_G64_ASYM, ignore=["lm_head"]),
                             clip=False)
        after = model(heldout_ids[:, :256]).logits
    assert len(awq.chosen) == 30 * 3  # v_proj -> o_proj skipped: 3 KV heads for 9 query heads
    assert (after - before).abs().max() <= 1e-4


def test_awq_beats_rtn_on_heldout_perplexity(smollm2, texts, heldout_ids):
    model, tokenizer = smollm2
    rtn, awq = copy.deepcopy(model), copy.deepcopy(model)
    lowbit.oneshot(rtn, lowbit.QuantizationModifier(config_groups=W4_G64_ASYM, ignore=["lm_head"]))
    lowbit.oneshot(awq, [lowbit.AWQModifier(), lowbit.QuantizationModifier(config_groups=W4_G64_ASYM,
                                                                            ignore=["lm_head"])],
                   dataset=texts[0], tokenizer=tokenizer, max_seq_length=128)
    ppl_rtn = perplexity(rtn, heldout_ids, seq_len=512)
    ppl_awq = perplexity(awq, heldout_ids, seq_len=512)
    print(f"held-out perplexity, W4 g64 asym: RTN {ppl_rtn:.2f}, AWQ {ppl_awq:.2f}")
    assert ppl_awq < ppl_rtn
