"""Data-parallel calibration (oneshot(..., distributed=True) in a gloo process group, or under
torchrun): with 2 and 3 processes every rank holds the same quantized weights, and they equal
the single-process run's up to float summation order (exactly, where the statistics are
order-free); rank 0 alone writes the checkpoint; a rank that dies makes the others fail with
a clear error instead of hanging; a missing process group is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.formats import compressed_state_dict
from tiny_models import TEXTS, fixed_ids, logits, make_model, make_tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))

# name -> recipe source (evaluated in the test and in every rank)
RECIPES = {
    "gptq_w4a16": 'lowbit.GPTQModifier(scheme="W4A16", ignore=["lm_head"])',
    "awq": '[lowbit.AWQModifier(), lowbit.QuantizationModifier(scheme="W4A16_ASYM", ignore=["lm_head"])]',
    "smoothquant_gptq_w8a8": '[lowbit.SmoothQuantModifier(smoothing_strength=0.8), '
                             'lowbit.GPTQModifier(scheme="W8A8", ignore=["lm_head"])]',
    "static_fp8_kv": 'lowbit.QuantizationModifier(scheme="FP8", ignore=["lm_head"], '
                     'kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, '
                     '"symmetric": True})',
    "static_int8_minmax": 'lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"], '
                          '"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, '
                          '"input_activations": {"num_bits": 8, "type": "int", "symmetric": True, '
                          '"strategy": "tensor", "dynamic": False, "observer": "minmax"}}}, ignore=["lm_head"])',
    "imatrix_mse": 'lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {'
                   '"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, '
                   '"observer": "imatrix_mse"}}}, ignore=["lm_head"])',
    "llm_int8": '"INT8_OUTLIER"',
}
# Statistics whose reduction is exact (maxima, minima, per-sample records replayed in order,
# float64 sums of few terms): the weights equal the single process's bit for bit.
EXACT = {"static_fp8_kv", "static_int8_minmax", "llm_int8", "imatrix_mse"}

_RANK = """
import datetime, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import lowbit
from lowbit.formats import compressed_state_dict
from safetensors.torch import save_file
from tiny_models import TEXTS, fixed_ids, logits, make_model, make_tokenizer
torch.set_num_threads(1)
launched = "LOCAL_RANK" in os.environ  # torchrun: oneshot starts the group itself
if not launched:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
die_at = os.environ.get("LOWBIT_TEST_DIE_AT")
if die_at is not None:  # this rank dies as decoder layer die_at begins
    pipeline = __import__("importlib").import_module("lowbit.pipeline.oneshot")
    calibrate = pipeline._calibrate_layer
    def dying(i, *args, **kwargs):
        if i == int(die_at) and dist.get_rank() == 1:
            os._exit(3)
        return calibrate(i, *args, **kwargs)
    pipeline._calibrate_layer = dying
model = make_model("llama_h128")
lowbit.oneshot(model, {recipe}, dataset=TEXTS, tokenizer=make_tokenizer(), max_seq_length=48,
               output_dir={out!r}, distributed={distributed})
save_file(compressed_state_dict(model), os.path.join({results!r}, f"rank{{dist.get_rank()}}.safetensors"))
save_file({{"logits": logits(model, fixed_ids())}}, os.path.join({results!r}, f"logits{{dist.get_rank()}}.safetensors"))
"""


def _single(recipe: str, output_dir=None):
    """(the single process's checkpoint tensors, its logits on fixed_ids)"""
    model = make_model("llama_h128")
    lowbit.oneshot(model, eval(RECIPES[recipe]), dataset=TEXTS, tokenizer=make_tokenizer(), max_seq_length=48,
                   output_dir=output_dir)
    return compressed_state_dict(model), logits(model, fixed_ids())


def _script(tmp_path, recipe, distributed="True"):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    code = _RANK.format(tests=TESTS, store=str(tmp_path / "store"), recipe=RECIPES[recipe], out=str(tmp_path / "out"),
                        distributed=distributed, results=str(results))
    script = tmp_path / "rank.py"
    script.write_text(code)
    return script, results


def _run_ranks(tmp_path, recipe, world, env=None, timeout=240):
    script, results = _script(tmp_path, recipe)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
             for r in range(world)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out.decode(errors="replace")))
    return outs, results


def _codes(state, name):
    """The integer codes of tensor `name` (4-bit packed words unpacked)."""
    if name.endswith("weight_packed"):
        shape = tuple(state[name.replace("weight_packed", "weight_shape")].tolist())
        return lowbit.functional.unpack(state[name], 4, shape)
    return state[name]


def _compare(single, ranks, exact: bool, single_logits=None, rank_logits=None):
    """Every rank equal to rank 0. Rank 0 equal to the single process bit for bit when exact;
    else within float summation tolerance, which GPTQ's error feedback widens: a last-bit
    difference in a Hessian (1e-7 relative) flips a code that sat on a rounding boundary, and
    the flip moves the codes after it in that row. So: float tensors to 1e-3 relative, at least
    95% of the integer codes equal, and the model's error (its logits against the float
    model's) within 2% of the single process's."""
    for other in ranks[1:]:
        assert other.keys() == ranks[0].keys()
        for name in other:
            assert torch.equal(other[name], ranks[0][name]), name
    assert single.keys() == ranks[0].keys()
    for name, a in single.items():
        b = ranks[0][name]
        if exact:
            assert torch.equal(a, b), name
        elif a.is_floating_point():
            err = (a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-30)
            assert err < 1e-3, (name, float(err))
        else:
            same = (_codes(single, name) == _codes(ranks[0], name)).float().mean()
            assert same >= 0.95, (name, float(same))
    if single_logits is not None:
        reference = logits(make_model("llama_h128"), fixed_ids())

        def error(x):
            return float((x - reference).norm() / reference.norm())

        if exact:
            assert torch.equal(single_logits, rank_logits)
        assert abs(error(rank_logits) - error(single_logits)) <= 0.02 * error(single_logits), \
            (error(rank_logits), error(single_logits))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_ranks_agree_with_a_single_process(tmp_path, recipe, world):
    outs, results = _run_ranks(tmp_path, recipe, world)
    for code, out in outs:
        assert code == 0, out[-3000:]
    ranks = [load_file(str(results / f"rank{r}.safetensors")) for r in range(world)]
    single_dir = tmp_path / "single"
    single, single_logits = _single(recipe, str(single_dir))
    _compare(single, ranks, recipe in EXACT, single_logits, load_file(str(results / "logits0.safetensors"))["logits"])
    # rank 0 wrote the checkpoint, and it holds rank 0's weights
    written = lowbit.formats.files.read_safetensors(str(tmp_path / "out"))
    assert written.keys() == ranks[0].keys() and all(torch.equal(written[k], ranks[0][k]) for k in written)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(single_dir))


def test_torchrun_starts_the_group(tmp_path):
    """Under torchrun, distributed='auto' (the default) starts the gloo group from the
    environment."""
    script, results = _script(tmp_path, "gptq_w4a16", distributed='"auto"')
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [load_file(str(results / f"rank{r}.safetensors")) for r in range(2)]
    single, single_logits = _single("gptq_w4a16")
    _compare(single, ranks, False, single_logits, load_file(str(results / "logits0.safetensors"))["logits"])


def test_a_rank_that_dies_fails_the_others_clearly(tmp_path):
    outs, results = _run_ranks(tmp_path, "gptq_w4a16", 2, env={"LOWBIT_TEST_DIE_AT": "1"}, timeout=120)
    (code0, out0), (code1, _) = outs
    assert code1 == 3
    assert code0 != 0 and "another rank probably stopped" in out0, out0[-3000:]
    assert not os.path.exists(tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".lowbit-")] == []


def test_distributed_needs_a_process_group(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="distributed=True needs a process group"):
        lowbit.oneshot(make_model("llama_h128"), "W4A16", pipeline="datafree", distributed=True,
                       output_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="distributed must be"):
        lowbit.oneshot(make_model("llama_h128"), "W4A16", pipeline="datafree", distributed="yes")


def test_too_few_samples_for_the_ranks(tmp_path):
    script, _ = _script(tmp_path, "gptq_w4a16")
    code = script.read_text().replace("dataset=TEXTS,", "dataset=TEXTS[:2], num_calibration_samples=2,")
    script.write_text(code)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(3)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode != 0 and b"cannot be shared by 3 processes" in out, out[-2000:]


def test_streamed_and_distributed(tmp_path):
    """stream_weights=True with 2 ranks: rank 0 writes the in-memory single-process bytes (an
    exact recipe)."""
    src = tmp_path / "src"
    make_model("llama_h128").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    script, _ = _script(tmp_path, "static_int8_minmax")
    code = script.read_text().replace('model = make_model("llama_h128")', f'model = {str(src)!r}')
    code = code.replace("distributed=True)", "distributed=True, stream_weights=True)")
    code = code.replace("tokenizer=make_tokenizer(), ", "")  # the one saved beside the model, as below
    code = code.split("save_file(compressed_state_dict", 1)[0]  # the returned model is a skeleton
    script.write_text(code)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    lowbit.oneshot(str(src), eval(RECIPES["static_int8_minmax"]), dataset=TEXTS, max_seq_length=48,
                   output_dir=str(tmp_path / "single"))
    names = sorted(os.listdir(tmp_path / "single"))
    assert names == sorted(os.listdir(tmp_path / "out"))
    # the tokenizer files are transformers' re-serialisation in two different processes
    for n in [n for n in names if not n.startswith(("tokenizer", "chat_template", "special_tokens"))]:
        assert (tmp_path / "single" / n).read_bytes() == (tmp_path / "out" / n).read_bytes(), n


@pytest.mark.parametrize("recipe,match", [
    ("lowbit.SmoothQuantModifier(num_calibration_steps=2)", "counts the first samples of one process"),
    ('lowbit.MixedPrecision(budget=6, options=["W4A16", "W8A16"])', "pass distributed=False"),
])
def test_refused_across_processes_before_loading(tmp_path, monkeypatch, recipe, match):
    """Settings that cannot calibrate across processes are refused before the model is read (a
    model path that does not exist shows that nothing was loaded)."""
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "store"), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        with pytest.raises(ValueError, match=match):
            lowbit.oneshot(str(tmp_path / "no-such-model"), eval(recipe), dataset=TEXTS, distributed=True,
                           output_dir=str(tmp_path / "out"))
    finally:
        dist.destroy_process_group()
    assert not os.path.exists(tmp_path / "out")
