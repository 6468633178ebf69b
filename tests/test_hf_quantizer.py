"""from_pretrained(path, quantization_config=lowbit.LowbitConfig(...)): quantization on load
through transformers' registered-quantizer hooks, equal to oneshot on the same float model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.formats import compressed_state_dict
from tiny_models import fixed_ids, logits, make_model, save_float

G32 = {"weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}}


@pytest.mark.parametrize("scheme,layer", [(G32, lowbit.nn.PackedLinear), ("W8A8", lowbit.nn.Int8DynamicLinear),
                                          ("NF4", lowbit.nn.NF4Linear), ("INT8_OUTLIER", lowbit.nn.Int8OutlierLinear),
                                          ("FP8_DYNAMIC", lowbit.nn.Fp8Linear)],
                         ids=["w4a16_asym-g32", "W8A8", "NF4", "INT8_OUTLIER", "FP8_DYNAMIC"])
def test_from_pretrained_quantizes_like_oneshot(tmp_path, scheme, layer):
    path = save_float("llama", tmp_path / "float")
    config = lowbit.LowbitConfig(scheme=scheme)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    assert isinstance(model.model.layers[0].mlp.down_proj, layer)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, layer)  # ignore=["lm_head"]
    reference = lowbit.oneshot(AutoModelForCausalLM.from_pretrained(path), config.recipe())
    ids = fixed_ids()
    assert torch.equal(logits(model, ids), logits(reference, ids))
    # save_pretrained writes the checkpoint oneshot writes
    model.save_pretrained(tmp_path / "saved")
    reference.save_pretrained(tmp_path / "reference")
    a, b = compressed_state_dict(lowbit.load(tmp_path / "saved")), compressed_state_dict(reference)
    same = [torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                        b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a]
    assert a.keys() == b.keys() and all(same)
    assert (tmp_path / "saved" / "config.json").read_text() == (tmp_path / "reference" / "config.json").read_text()


def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="unknown scheme"):
        lowbit.LowbitConfig(scheme="W5A5")
    with pytest.raises(ValueError, match="static activation scales on data"):
        lowbit.LowbitConfig(scheme="FP8")
    path = save_float("llama", tmp_path / "float")
    with pytest.raises(ValueError, match="CPU kernels; got device_map=.*cuda"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.LowbitConfig(scheme=G32),
                                             device_map="cuda")
    quantized = lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(config_groups={"g": {
        "targets": ["Linear"], **G32}}, ignore=["lm_head"]), output_dir=tmp_path / "q")
    assert quantized is not None
    with pytest.raises(ValueError, match="quantized with CompressedTensorsConfig"):  # transformers' own check
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=lowbit.LowbitConfig(scheme=G32))
