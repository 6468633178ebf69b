"""Mixed precision for a size budget: the sensitivity report (sizes as the checkpoint stores them,
errors as the layer's outputs show them), the knapsack allocation (within the budget, optimal
against brute force), MixedPrecision in oneshot (Python and YAML, checkpoints stock
transformers loads), and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open

import lowbit
from lowbit import functional as F
from lowbit.modifiers.mixed_precision import GRID_UNITS, Budget
from lowbit.modifiers.sensitivity import GRADIENT_SAMPLES, SensitivityReport, SensitivityRow, weight_options

import tiny_models as tm
from test_gguf import dequantized_model, llama_logits

OPTIONS = ["W2A16", "W3A16", "W4A16", "W8A16"]
DATA = tm.TEXTS * 4


@pytest.fixture(scope="module")
def tokenizer():
    return tm.make_tokenizer()


@pytest.fixture(scope="module")
def report(tokenizer):
    return lowbit.sensitivity(tm.make_model("llama"), DATA, OPTIONS, group_size=32, tokenizer=tokenizer,
                              num_calibration_samples=len(DATA))


def linear_inputs(model, ids):
    """Every Linear's input on a float forward pass: name -> [tokens, in]."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.inference_mode():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


# ---------------------------------------------------------------- the report

def test_report_errors_are_the_layers_output_errors(tokenizer, report):
    """output_error is ||X W^T - X Q^T||^2 over the calibration tokens, X each Linear's input in
    the float model; relative_error divides it by ||X W^T||^2."""
    model = tm.make_model("llama")
    samples = lowbit.pipeline.prepare_calibration(DATA, tokenizer, num_calibration_samples=len(DATA),
                                                  max_seq_length=2048)
    xs = linear_inputs(model, [s["input_ids"][0] for s in samples])
    assert report.layers == list(xs) and len(report) == len(xs) * len(OPTIONS)
    for row in report.rows:
        w = model.get_submodule(row.layer).weight.detach()
        bits = int(row.option[1])
        q = F.fake_quantize(w, bits, True, "group", 32)
        x = xs[row.layer].double()
        expected = (x @ (w - q).double().T).pow(2).sum().item()
        assert row.output_error == pytest.approx(expected, rel=1e-4), row
        assert row.relative_error == pytest.approx(expected / (x @ w.double().T).pow(2).sum().item(), rel=1e-4)


def test_report_loss_error_is_the_fisher_estimate(tokenizer, report):
    """loss_error = 1/2 sum_i E[g_i^2] ||X (W-Q)_i^T||^2 / tokens: g the gradient of the summed
    next-token loss at each Linear's output (autograd on the float model, here directly) over the
    first GRADIENT_SAMPLES samples, X every calibration token's input."""
    model = tm.make_model("llama")
    # oneshot's samples, in its (seeded, shuffled) order
    samples = lowbit.pipeline.prepare_calibration(DATA, tokenizer, num_calibration_samples=len(DATA),
                                                  max_seq_length=2048, shuffle=True, seed=0)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    grads, inputs, grad_tokens = {n: [] for n in names}, {n: [] for n in names}, 0
    for k, sample in enumerate(samples):
        outs = {}

        def keep(module, args, out, name):
            outs[name] = out
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)) for n in names]
        logits = model(**sample).logits[0, :-1]
        for h in hooks:
            h.remove()
        if k < GRADIENT_SAMPLES:
            loss = torch.nn.functional.cross_entropy(logits, sample["input_ids"][0, 1:], reduction="sum")
            for n, g in zip(names, torch.autograd.grad(loss, [outs[n] for n in names])):
                grads[n].append(g.reshape(-1, g.shape[-1]))
            grad_tokens += sample["input_ids"].shape[1] - 1
    rows = {(r.layer, r.option): r for r in report.rows}
    for n in names:
        fisher = torch.cat(grads[n]).double().pow(2).sum(0) / grad_tokens
        x, w = torch.cat(inputs[n]).double(), model.get_submodule(n).weight.detach()
        for option in OPTIONS:
            d = (w - F.fake_quantize(w, int(option[1]), True, "group", 32)).double()
            expected = 0.5 * (fisher * (x @ d.T).pow(2).sum(0)).sum().item() / x.shape[0]
            assert rows[(n, f"{option}_g32")].loss_error == pytest.approx(expected, rel=1e-3), (n, option)


def test_gradient_pass_in_loss_chunks_equals_the_whole_forward(tokenizer, monkeypatch):
    """The LM head and loss run a few tokens at a time on the body's output (the full-vocabulary
    logits never exist at once): E[g^2] equals the one from the model's own forward."""
    from lowbit.modifiers import sensitivity as sens

    samples = lowbit.pipeline.prepare_calibration(DATA, tokenizer, num_calibration_samples=4, max_seq_length=2048)
    assert max(s["input_ids"].shape[1] for s in samples) > 7
    fishers = []
    for chunk, transforms in ((3, sens._LOGIT_TRANSFORMS), (3, ("model_type",))):  # model_type: the whole forward
        monkeypatch.setattr(sens, "LOSS_CHUNK_TOKENS", chunk)
        monkeypatch.setattr(sens, "_LOGIT_TRANSFORMS", transforms)
        gatherer = sens.SensitivityGatherer(OPTIONS, group_size=32)
        gatherer.prepare_model(tm.make_model("llama"), samples)
        fishers.append(gatherer._fisher)
    assert fishers[0].keys() == fishers[1].keys() and len(fishers[0]) > 0
    for name in fishers[0]:
        torch.testing.assert_close(fishers[0][name], fishers[1][name], rtol=1e-4, atol=1e-12)


def test_report_bytes_are_the_checkpoints(tokenizer, report, tmp_path):
    """Each option's bytes are what the compressed-tensors checkpoint stores for that Linear."""
    for option in OPTIONS:
        scheme = weight_options(OPTIONS, group_size=32)[f"{option}_g32"]
        recipe = lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"],
                                                                  "weights": scheme.weights.to_dict()}},
                                             ignore=["lm_head"])
        out = tmp_path / option
        lowbit.oneshot(tm.make_model("llama"), recipe, output_dir=out)
        stored = {}
        with safe_open(out / "model.safetensors", "pt") as f:
            for key in f.keys():
                owner, _, leaf = key.rpartition(".")
                if leaf.startswith("weight_"):
                    stored[owner] = stored.get(owner, 0) + f.get_tensor(key).nbytes
        rows = {r.layer: r.bytes for r in report.rows if r.option == f"{option}_g32"}
        assert rows == stored


def test_gptq_errors_are_below_rtns(tokenizer, report):
    gptq = lowbit.sensitivity(tm.make_model("llama"), DATA, OPTIONS, method="gptq", group_size=32,
                              tokenizer=tokenizer, num_calibration_samples=len(DATA))
    pairs = [(g.output_error, r.output_error) for g, r in zip(gptq.rows, report.rows)]
    assert sum(g <= r for g, r in pairs) >= 0.9 * len(pairs)
    assert sum(g for g, _ in pairs) < 0.8 * sum(r for _, r in pairs)


def test_report_tables_and_plot(report, tmp_path):
    csv_text = report.to_csv(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text() == csv_text
    lines = csv_text.splitlines()
    assert lines[0] == "layer,option,bytes,bits_per_weight,output_error,relative_error,loss_error"
    assert len(lines) == 1 + len(report.rows)
    md = report.to_markdown().splitlines()
    assert md[0] == "| layer | " + " | ".join(f"{o}_g32 loss" for o in OPTIONS) + " |"
    assert len(md) == 2 + len(report.layers) and md[2].startswith("| model.layers.0.self_attn.q_proj | ")
    fig = report.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000 and len(fig.axes[0].lines) == len(report.layers)


# ---------------------------------------------------------------- the allocation

def synthetic_report(sizes, errors, options):
    rows = [SensitivityRow(f"layer{i}", o, b, 8, e, e, e) for i, (bs, es) in enumerate(zip(sizes, errors))
            for o, b, e in zip(options, bs, es)]
    return SensitivityReport(rows, {o: None for o in options}, "rtn")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), n_layers=st.integers(1, 6), n_options=st.integers(2, 3))
def test_allocation_is_optimal_against_brute_force(data, n_layers, n_options):
    """Against every combination of options: within the budget, and no combination that fits a
    budget smaller by the grid's rounding (one unit per layer) has less error."""
    sizes = [sorted(data.draw(st.lists(st.integers(100, 5000), min_size=n_options, max_size=n_options, unique=True)))
             for _ in range(n_layers)]
    errors = [sorted(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n_options, max_size=n_options)), reverse=True)
              for _ in range(n_layers)]
    options = [f"o{k}" for k in range(n_options)]
    low, high = sum(s[0] for s in sizes), sum(s[-1] for s in sizes)
    budget = data.draw(st.integers(low, high))
    allocation = lowbit.allocate(synthetic_report(sizes, errors, options), {"bytes": budget})
    picked = [options.index(allocation.choice[f"layer{i}"]) for i in range(n_layers)]
    assert allocation.bytes == sum(s[k] for s, k in zip(sizes, picked)) <= budget
    slack = budget - n_layers * budget / GRID_UNITS
    best = min((sum(e[k] for e, k in zip(errors, combo)) for combo in itertools.product(range(n_options), repeat=n_layers)
                if sum(s[k] for s, k in zip(sizes, combo)) <= slack), default=None)
    if best is not None:
        assert allocation.error <= best + 1e-9


@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), bits=st.floats(2.6, 8.4))
def test_allocation_hits_the_budget(seed, bits):
    """On a model-sized problem (210 Linears of SmolLM2's shapes, four options) the allocation
    comes within 0.5% of the budget, never above it."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    sizes = [[out * inp * (b + 0.5) / 8 for b in (2, 3, 4, 8)] for out, inp in shapes]
    errors = [sorted((torch.rand(4, generator=g) * 4.0 ** -torch.arange(4)).tolist(), reverse=True) for _ in shapes]
    report = synthetic_report([[int(x) for x in s] for s in sizes], errors, OPTIONS)
    weights = sum(out * inp for out, inp in shapes)
    rows = [SensitivityRow(r.layer, r.option, r.bytes, out * inp, r.output_error, r.relative_error, r.loss_error)
            for r, (out, inp) in zip(report.rows, [s for s in shapes for _ in range(4)])]
    allocation = lowbit.allocate(SensitivityReport(rows, report.options, "rtn"), bits)
    budget = int(bits * weights / 8)
    assert allocation.budget_bytes == budget
    assert (1 - 0.005) * budget <= allocation.bytes <= budget


def test_budget_forms():
    assert Budget.parse(3.5) == Budget.parse("3.5bpw") == Budget.parse("3.5 bits") == Budget.parse({"bits": 3.5})
    assert Budget.parse("40MiB") == Budget.parse({"bytes": 40 * 2**20}) == Budget(bytes=41943040)
    assert Budget.parse("45MB").bytes == 45_000_000
    assert Budget.parse({"memory": "1GiB", "context_length": 512}) == Budget(memory=2**30, context_length=512)
    for bad in (0, -1, "lots", {"bits": 3, "bytes": 4}, {"memory": "1GiB", "context": 5}, float("nan"), True, None):
        with pytest.raises((ValueError, TypeError)):
            Budget.parse(bad)


# ---------------------------------------------------------------- in oneshot

def test_mixed_precision_oneshot(tokenizer, tmp_path):
    """MixedPrecision through oneshot: the chosen schemes are the allocation of the sensitivity
    report, the checkpoint holds one config group per option used, stock transformers loads it
    with lowbit's logits, and the saved recipe.yaml reproduces the same bytes."""
    from transformers import AutoModelForCausalLM

    recipe = lowbit.MixedPrecision(budget=4.5, options=OPTIONS, group_size=32)
    model = lowbit.oneshot(tm.make_model("llama"), recipe, dataset=DATA, tokenizer=tokenizer,
                           num_calibration_samples=16, output_dir=tmp_path / "out")
    allocation = recipe.allocation
    report = lowbit.sensitivity(tm.make_model("llama"), DATA, OPTIONS, method="gptq", group_size=32,
                                tokenizer=tokenizer, num_calibration_samples=16)
    assert lowbit.allocate(report, 4.5).choice == allocation.choice
    assert len(set(allocation.choice.values())) > 1 and allocation.bytes <= allocation.budget_bytes
    for name, label in allocation.choice.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, lowbit.nn.PackedLinear) and layer.args.num_bits == int(label[1]), name
    qc = model.config.quantization_config
    assert len(qc["config_groups"]) == len(set(allocation.choice.values()))
    stored = sum(f.get_tensor(k).nbytes for f in [safe_open(tmp_path / "out" / "model.safetensors", "pt")]
                 for k in f.keys() if k.rpartition(".")[2].startswith("weight_"))
    assert stored == allocation.bytes
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tm.fixed_ids()
    assert tm.rel_err(tm.logits(stock, ids), tm.logits(model, ids)) < 1e-4
    yaml_text = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "GPTQModifier" in yaml_text and "config_groups" in yaml_text
    lowbit.oneshot(tm.make_model("llama"), yaml_text, dataset=DATA, tokenizer=tokenizer, num_calibration_samples=16,
                   output_dir=tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_mixed_precision_from_yaml_and_memory_budget(tokenizer, tmp_path):
    """The YAML form, with a memory budget: the quantized model's memory (its Linears as
    stored, the rest of the model, the KV cache, memory_estimate's reserve) fits it."""
    from lowbit.eval import memory_estimate
    from lowbit.eval.memory import RESERVE_PERCENT

    float_model = tm.make_model("llama")
    linears = [n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)]
    rest = memory_estimate(float_model, "W8A16", ignore=linears, context_length=256)
    lm_head = float_model.lm_head.weight.nbytes
    others = rest.weights_bytes - sum(float_model.get_submodule(n).weight.nbytes for n in linears) + lm_head
    n_weights = sum(float_model.get_submodule(n).weight.numel() for n in linears if n != "lm_head")
    target = int((others + rest.kv_cache_bytes + 6 * n_weights / 8) * (100 + RESERVE_PERCENT) / 100)
    recipe = f"""
quant_stage:
  quant_modifiers:
    MixedPrecision:
      budget: {{memory: {target}, context_length: 256}}
      options: [W2A16, W4A16, W8A16]
      group_size: 32
      method: rtn
"""
    model = lowbit.oneshot(tm.make_model("llama"), recipe, dataset=DATA, tokenizer=tokenizer, num_calibration_samples=8,
                           output_dir=tmp_path / "out")
    stored_linears = sum(m.weight_packed.nbytes + m.weight_scale.nbytes + m.weight_shape.nbytes
                         for m in model.modules() if isinstance(m, lowbit.nn.PackedLinear))
    total = (stored_linears + others + rest.kv_cache_bytes) * (100 + RESERVE_PERCENT) / 100
    assert 0.97 * target <= total <= target


def test_bad_input(tokenizer):
    model = tm.make_model("llama")
    report = lowbit.sensitivity(model, DATA, OPTIONS, group_size=32, tokenizer=tokenizer, num_calibration_samples=4)
    with pytest.raises(ValueError, match="below the smallest option"):
        lowbit.allocate(report, 2.0)
    with pytest.raises(ValueError, match="above the largest option"):
        lowbit.allocate(report, 9.5)
    with pytest.raises(ValueError, match="weight-only integer schemes"):
        lowbit.MixedPrecision(budget=4, options=["W4A16", "NF4"])
    with pytest.raises(ValueError, match="weight-only integer schemes"):
        lowbit.MixedPrecision(budget=4, options=["W4A16", "W8A8"])
    with pytest.raises(ValueError, match="weight-only integer schemes"):
        lowbit.MixedPrecision(budget=4, options=["Q4_K_M", "W8A16"])
    with pytest.raises(ValueError, match="at least two weight schemes"):
        lowbit.MixedPrecision(budget=4, options=["W4A16"])
    with pytest.raises(ValueError, match="method must be one of"):
        lowbit.MixedPrecision(budget=4, method="awq")
    with pytest.raises(ValueError, match="no option's group size divides the input columns"):
        lowbit.oneshot(tm.make_model("llama"), lowbit.MixedPrecision(budget=4, options=["W2A16", "W4A16"]),
                       dataset=DATA, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="lie outside the decoder layers"):
        lowbit.sensitivity(model, DATA, OPTIONS, group_size=32, tokenizer=tokenizer, ignore=None)
    with pytest.raises(ValueError, match="budget .* is below the smallest option"):  # before any data is read
        lowbit.oneshot(tm.make_model("llama"), lowbit.MixedPrecision(budget="1KB", options=OPTIONS, group_size=32),
                       dataset=[1234], tokenizer=tokenizer)


def test_cli_sensitivity(tokenizer, tmp_path, capsys):
    """`lowbit sensitivity MODEL --dataset FILE`: the report of a local model directory."""
    from lowbit import cli

    tm.save_float("llama", tmp_path / "model", tokenizer=True)
    (tmp_path / "data.txt").write_text("\n".join(DATA))
    cli.main(["sensitivity", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.txt"), "--group-size", "32",
              "--samples", "8", "--csv", str(tmp_path / "s.csv")])
    out = capsys.readouterr().out
    assert out.startswith("| layer | W2A16_g32 loss | W3A16_g32 loss | W4A16_g32 loss | W8A16_g32 loss |")
    assert "| model.layers.1.mlp.down_proj | " in out
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 1 + 14 * 4
    with pytest.raises(SystemExit, match="no option's group size divides"):
        cli.main(["sensitivity", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.txt")])


def test_mixed_precision_gguf(llama_bin, tmp_path):
    """ggml block types as options: each Linear gets its chosen tensor type in a GGUF file that
    llama.cpp runs (logits of the model the file describes), the Linears' blocks take the
    allocation's bytes, and the recipe (config groups of block types) reproduces the file."""
    import gguf

    tokenizer = tm.make_bpe_tokenizer()
    recipe = lowbit.MixedPrecision(budget=5.0, options=["Q3_K", "Q4_K", "Q6_K"], method="gptq")
    model = lowbit.oneshot(tm.make_gguf_model("llama"), recipe, dataset=DATA, tokenizer=tokenizer,
                           num_calibration_samples=16, output_dir=tmp_path / "out", save_format="gguf",
                           gguf_type="Q4_K_M")
    allocation = recipe.allocation
    assert len(set(allocation.choice.values())) > 1
    path = tmp_path / "out" / "model-Q4_K_M.gguf"
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    names = lowbit.ggml.name_map(model)
    total = 0
    for layer, label in allocation.choice.items():
        tensor = stored[lowbit.ggml.gguf_name(names, f"{layer}.weight")]
        assert tensor.tensor_type.name == label, layer
        total += int(tensor.n_bytes)
    assert total == allocation.bytes <= allocation.budget_bytes
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    with torch.inference_mode():
        expected = dequantized_model(model, path)(torch.tensor([ids])).logits[0]
    assert tm.rel_err(llama_logits(llama_bin, path, ids), expected) < 5e-2
    yaml_text = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "gguf: Q6_K" in yaml_text or "gguf: Q4_K" in yaml_text
    lowbit.oneshot(tm.make_gguf_model("llama"), yaml_text, dataset=DATA, tokenizer=tokenizer, num_calibration_samples=16,
                   output_dir=tmp_path / "again", save_format="gguf", gguf_type="Q4_K_M")
    assert (tmp_path / "again" / "model-Q4_K_M.gguf").read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="cannot share a checkpoint"):
        lowbit.MixedPrecision(budget=5, options=["Q4_K", "W8A16"])
