"""Sensitivity of each Linear to each candidate weight scheme: its stored size and the error it
adds to the layer's output on the calibration tokens, measured in one layer-sequential pass over
the float model. MixedPrecision allocates bits from it."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import functional as F
from .. import ggml, ops
from ..eval.memory import linear_bytes
from ..schemes import PRESET_SCHEMES, GGUFScheme, QuantizationScheme, gguf_tensor_scheme, plain, resolve_scheme
from .base import Modifier, input_hooks
from .gptq import solve_gguf

METHODS = ("rtn", "gptq")
# The loss gradients' E[g^2] per output channel is a mean over tokens: a few samples estimate it
# well, and the backward pass through the whole model (LM head included) is the dearest part.
GRADIENT_SAMPLES = 8
# Tokens per slice of the LM head and loss in the gradient pass: full-vocabulary logits of a whole
# sample (and their softmax and gradient) would outgrow everything else the pass holds.
LOSS_CHUNK_TOKENS = 128
# Config fields of CausalLMs that transform the LM head's output before the loss: those models run
# their own forward whole.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


Option = Union[QuantizationScheme, GGUFScheme]


def weight_options(options: Sequence, group_size: Optional[int] = None) -> Dict[str, Option]:
    """Candidate schemes by label, fewest bits first. Either weight-only integer schemes (preset
    names "W2A16" ... "W8A16", "W4A16_ASYM", compressed-tensors scheme dicts or
    QuantizationSchemes), which share one compressed-tensors checkpoint (a config group each;
    group_size replaces the group size of every grouped one: the presets' 128 does not divide
    576-column models such as SmolLM2), or ggml block types ("Q2_K" ... "Q8_0"), which share one
    GGUF file (a tensor type each)."""
    if isinstance(options, (str, dict)) or not isinstance(options, Sequence) or len(options) < 2:
        raise ValueError(f"options must be a list of at least two weight schemes to choose from, e.g. "
                         f"['W2A16', 'W3A16', 'W4A16', 'W8A16'] or ['Q3_K', 'Q4_K', 'Q6_K'], got {options!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    out: Dict[str, Option] = {}
    for option in options:
        label, scheme = _option(option, group_size)
        if label in out:
            raise ValueError(f"option {label} is given twice")
        out[label] = scheme
    if len({type(s) for s in out.values()}) > 1:
        raise ValueError(f"options {list(out)} mix integer schemes (a compressed-tensors checkpoint) with ggml block "
                         "types (a GGUF file), which cannot share a checkpoint: choose among one kind")
    return dict(sorted(out.items(), key=lambda kv: _bits_per_weight(kv[1])))


def _option(option, group_size: Optional[int]) -> Tuple[str, Option]:
    if isinstance(option, str) and option.upper() in ggml.BLOCK_TYPES:
        return option.upper(), gguf_tensor_scheme(option)
    if isinstance(option, GGUFScheme) and option.tensor_type is not None:
        return option.tensor_type, option
    try:
        scheme = resolve_scheme(option)
    except (ValueError, TypeError):  # NF4, FP4, INT8_OUTLIER, typos: none of them a weight scheme
        scheme = None
    if not isinstance(scheme, QuantizationScheme) or scheme.input_activations is not None \
            or scheme.weights.type != "int" or scheme.weights.strategy not in ("group", "channel"):
        raise ValueError(f"option {plain(option)!r}: mixed precision chooses among weight-only integer schemes "
                         "(W2A16 ... W8A16, W4A16_ASYM, or dicts of per-group / per-channel int weights) or among "
                         "ggml block types (Q2_K ... Q8_0); activation, FP8, NF4 or GGUF mix schemes cannot be "
                         "chosen per layer")
    w = scheme.weights
    if group_size is not None and w.strategy == "group":
        scheme = QuantizationScheme(dataclasses.replace(w, group_size=group_size))
        w = scheme.weights
    if isinstance(option, str) and option.upper() in PRESET_SCHEMES and group_size is None:
        return option.upper(), scheme
    grid = f"g{w.group_size}" if w.strategy == "group" else "channel"
    return f"W{w.num_bits}A16{'' if w.symmetric else '_ASYM'}_{grid}", scheme


def _bits_per_weight(scheme: Option) -> float:
    if isinstance(scheme, GGUFScheme):
        block, nbytes = ggml.block_layout(scheme.tensor_type)
        return 8 * nbytes / block
    w = scheme.weights
    return w.num_bits + (16 + (0 if w.symmetric else w.num_bits)) / (w.group_size if w.strategy == "group" else 4096)


def option_for_recipe(option):
    """An option as recipe.yaml writes it: a preset or block type name, or a scheme dict."""
    option = plain(option)
    if isinstance(option, GGUFScheme):
        return option.tensor_type
    return option.to_dict() if isinstance(option, QuantizationScheme) else option


def fits(scheme: Option, in_features: int) -> bool:
    if isinstance(scheme, GGUFScheme):
        return in_features % ggml.BLOCK[scheme.tensor_type] == 0
    w = scheme.weights
    return w.strategy != "group" or in_features % w.group_size == 0


def option_bytes(scheme: Option, module: nn.Module) -> int:
    """Stored bytes of `module`'s weight under `scheme`: the compressed-tensors checkpoint's
    tensors, or the GGUF file's blocks."""
    if isinstance(scheme, GGUFScheme):
        return module.out_features * ggml.row_bytes(scheme.tensor_type, module.in_features)
    return linear_bytes(module.out_features, module.in_features, scheme.weights, module.weight.element_size()).total


def check_fit(options: Dict[str, Option], modules: Dict[str, nn.Module]) -> None:
    """ValueError naming the modules whose input columns no option's grid fits."""
    unfit = [f"{n} ({m.in_features} columns)" for n, m in modules.items()
             if not any(fits(s, m.in_features) for s in options.values())]
    if unfit:
        raise ValueError(f"no option's group size divides the input columns of {', '.join(unfit[:4])}"
                         f"{f' and {len(unfit) - 4} more' if len(unfit) > 4 else ''}: pass group_size= (one "
                         "that divides them, e.g. 64 or 32), add a per-channel option (or a 32-block GGUF type), "
                         "or ignore those layers")


@dataclasses.dataclass(frozen=True)
class SensitivityRow:
    """One Linear under one option: stored bytes (checkpoint layout, bf16/fp16 scales as the
    model's dtype stores them), its weights, and the error it adds on the calibration tokens:
    output_error = ||X W^T - X Q^T||^2 summed over tokens (= tr((W-Q) X^T X (W-Q)^T): the
    Hessian-weighted error GPTQ minimises), relative_error = output_error / ||X W^T||^2, and
    loss_error, the increase of the model's calibration loss (nats per token) this error alone
    would cause to second order: 1/2 sum_i E[g_i^2] ||X (W-Q)_i^T||^2 / tokens, with g_i the
    loss gradient at output channel i (the empirical Fisher, diagonal over output channels, its
    mean over the first GRADIENT_SAMPLES samples' tokens)."""

    layer: str
    option: str
    bytes: int
    weights: int
    output_error: float
    relative_error: float
    loss_error: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights


class SensitivityReport:
    """Every targeted Linear under every option (rows in layer order, options fewest bits
    first). to_markdown(), to_csv(), plot() (matplotlib) and, by layer, table()."""

    def __init__(self, rows: List[SensitivityRow], options: Dict[str, QuantizationScheme], method: str):
        self.rows, self.options, self.method = rows, options, method

    @property
    def layers(self) -> List[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    def table(self) -> Dict[str, Dict[str, SensitivityRow]]:
        """layer -> option -> row (only the options whose grid fits the layer)."""
        out: Dict[str, Dict[str, SensitivityRow]] = {}
        for r in self.rows:
            out.setdefault(r.layer, {})[r.option] = r
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"SensitivityReport({len(self.layers)} layers x options {list(self.options)}, method={self.method!r}, "
                f"{sum(r.weights for r in self.rows) // max(len(self.options), 1):,} weights)")

    _COLUMNS = ("layer", "option", "bytes", "bits_per_weight", "output_error", "relative_error", "loss_error")

    def _values(self, r: SensitivityRow) -> tuple:
        return (r.layer, r.option, r.bytes, f"{r.bits_per_weight:.3f}", f"{r.output_error:.6g}",
                f"{r.relative_error:.6g}", f"{r.loss_error:.6g}")

    def to_csv(self, path=None) -> str:
        """The rows as CSV (returned, and written to `path` when given)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self._COLUMNS)
        writer.writerows(self._values(r) for r in self.rows)
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
        return buf.getvalue()

    def to_markdown(self) -> str:
        """One row per layer, the estimated loss increase under each option (— where its grid
        does not fit the layer)."""
        table = self.table()
        head = ["layer", *(f"{o} loss" for o in self.options)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer, by_option in table.items():
            cells = [f"{by_option[o].loss_error:.4g}" if o in by_option else "—" for o in self.options]
            lines.append("| " + " | ".join([layer, *cells]) + " |")
        return "\n".join(lines)

    def plot(self, path=None):
        """Estimated loss increase (log scale) against bits per weight, one line per layer; saved
        to `path` when given. -> the matplotlib Figure. Needs matplotlib (pip install 'lowbit[plot]')."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("SensitivityReport.plot needs matplotlib: pip install 'lowbit[plot]'") from None
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for layer, by_option in self.table().items():
            rows = sorted(by_option.values(), key=lambda r: r.bits_per_weight)
            ax.plot([r.bits_per_weight for r in rows], [max(r.loss_error, 1e-12) for r in rows], alpha=0.4,
                    linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (scales included)")
        ax.set_ylabel("estimated loss increase (nats per token)")
        ax.set_title(f"{len(self.layers)} layers, {self.method.upper()}")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


class SensitivityGatherer(Modifier):
    """Measures, decoder layer by decoder layer on the float model, every targeted Linear under
    every option: the loss gradient's E[g^2] per output channel comes from one forward and
    backward pass over the calibration data first; each Linear's Hessian X^T X is gathered in
    the layer's float pass, then each option is applied to a copy of its weight (round-to-nearest,
    or GPTQ on that Hessian) and scored. It quantizes nothing; `.report` afterwards."""

    requires_calibration = True
    collects_statistics = True
    measures_only = True
    propagates_float_outputs = True

    def __init__(self, options: Sequence = ("W2A16", "W3A16", "W4A16", "W8A16"), method: str = "rtn",
                 group_size: Optional[int] = None, targets="Linear", ignore=("lm_head",), block_size: int = 128,
                 dampening_frac: float = 0.01):
        super().__init__(targets, ignore)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.options = weight_options(options, group_size)
        self._given_options, self.group_size = [option_for_recipe(o) for o in options], group_size
        self.method, self.block_size, self.dampening_frac = method, block_size, dampening_frac
        self._selected: Dict[str, nn.Module] = {}
        self._hessians: Dict[str, Tuple[torch.Tensor, int]] = {}
        self._fisher: Dict[str, torch.Tensor] = {}  # name -> E[g^2] per output channel
        self._rows: List[SensitivityRow] = []

    def prepare_model(self, model: nn.Module, samples: list) -> None:
        """E[g^2] per output channel of every targeted Linear, g the gradient of the summed
        next-token loss at its output, over the first GRADIENT_SAMPLES calibration samples
        (forward and backward through the float model; no weight gradients are formed)."""
        selected = self.select(model)
        sums = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in selected.items()}

        def keep(name):
            def add(g):
                sums[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0))

            def forward_hook(module, args, out):
                if out.requires_grad:
                    out.register_hook(add)
            return forward_hook

        embeddings = model.get_input_embeddings()
        hooks = [m.register_forward_hook(keep(n)) for n, m in selected.items()]
        hooks.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        # Checkpointed decoder layers keep only their inputs for the backward pass, so the peak
        # stays near oneshot's: transformers checkpoints a layer in training mode, which is set
        # on the layers alone (their attention and dropout stay in eval mode).
        enable = getattr(model, "supports_gradient_checkpointing", False) and \
            not getattr(model, "is_gradient_checkpointing", True)
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointed = [(m, m.training) for m in model.modules()
                        if getattr(m, "gradient_checkpointing", False) is True and m is not model]
        for m, _ in checkpointed:
            m.training = True
        tokens = 0
        try:
            with torch.enable_grad():
                for sample in samples[:GRADIENT_SAMPLES]:
                    tokens += _loss_backward(model, sample)
        finally:
            for h in hooks:
                h.remove()
            for p in trainable:
                p.requires_grad_(True)
            for m, training in checkpointed:
                m.training = training
            if enable:
                model.gradient_checkpointing_disable()
        self._fisher = {name: (s / max(tokens, 1)).float() for name, s in sums.items()}

    def prepare(self, model: nn.Module, layer_names, plan) -> None:
        self._selected = self.select(model)
        self._rows, self._hessians = [], {}
        check_fit(self.options, self._selected)
        names = set(layer_names)
        outside = [n for n in self._selected if not any(n.startswith(p + ".") for p in names)]
        if outside:
            raise ValueError(f"{', '.join(outside[:4])} lie outside the decoder layers, which the sensitivity pass "
                             "measures one at a time; add them to ignore (lm_head usually is)")

    def layer_hooks(self, prefix: str, layer: nn.Module, plan) -> list:
        return input_hooks(prefix, layer, self._selected, self._accumulate)

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        h, n = self._hessians.get(name, (None, 0))
        self._hessians[name] = F.hessian(x.detach(), h, n, mirror=False)

    def transform_layer(self, prefix: str, layer: nn.Module, plan) -> None:
        """Score this decoder layer's Linears under every option (the layer itself is unchanged)."""
        for name in [n for n in self._selected if n.startswith(prefix + ".")]:
            if name not in self._hessians:
                raise ValueError(f"{name} saw no calibration data: the sensitivity pass runs each layer on the dataset")
            h, n = self._hessians.pop(name)
            F.mirror_hessian_(h)
            self._rows += self.score(name, self._selected[name].weight.detach(), h, n, self._fisher.get(name))

    def score(self, name: str, w: torch.Tensor, h: torch.Tensor, n: int,
              fisher: Optional[torch.Tensor] = None) -> List[SensitivityRow]:
        """The rows of one Linear: weight w [out, in], Hessian h = 2/n X^T X of n tokens, fisher
        E[g^2] per output channel (None: loss_error 0)."""
        wf = w.float()
        reference = ((wf @ h) * wf).sum().item() * n / 2  # ||X W^T||^2
        rows = []
        for label, scheme in self.options.items():
            if not fits(scheme, w.shape[1]):
                continue
            if isinstance(scheme, GGUFScheme):
                rows.append(self._row(name, label, w, self._gguf_weight(wf, h, scheme.tensor_type), h, n, reference,
                                      w.shape[0] * ggml.row_bytes(scheme.tensor_type, w.shape[1]), fisher))
                continue
            a = scheme.weights
            gs = a.group_size if a.strategy == "group" else None
            if self.method == "gptq":
                result = F.gptq(w, h, bits=a.num_bits, group_size=gs, symmetric=a.symmetric, actorder="static",
                                block_size=self.block_size, dampening_frac=self.dampening_frac,
                                observer=a.weight_observer)
                q = F.dequantize(result.codes, result.scale.float(), result.zero_point, torch.float32)
            else:
                q = F.fake_quantize(wf, a.num_bits, a.symmetric, a.strategy, gs, a.weight_observer)
            rows.append(self._row(name, label, w, q, h, n, reference,
                                  linear_bytes(*w.shape, a, w.element_size()).total, fisher))
        return rows

    def _gguf_weight(self, wf: torch.Tensor, h: torch.Tensor, tensor_type: str) -> torch.Tensor:
        """The weight on `tensor_type`'s blocks: ggml's quantizer weighted by E[x^2] (llama.cpp's
        imatrix, what a calibrated RTN export does), or GPTQ over its grid."""
        if self.method == "gptq":
            blocks, _, _ = solve_gguf(wf, h, tensor_type, self.block_size, self.dampening_frac)
        else:
            blocks = ops.gguf_quantize(wf, tensor_type, (torch.diag(h) / 2).clamp_min(0).contiguous())
        return ops.gguf_dequantize(blocks, tensor_type, wf.shape[1], torch.float32)

    def _row(self, name, label, w, q, h, n, reference, nbytes, fisher) -> SensitivityRow:
        d = w.float() - q
        per_row = ((d @ h) * d).sum(1).clamp_min(0) * (n / 2)  # ||X (W-Q)_i^T||^2 per output channel
        error = per_row.sum().item()
        loss = 0.0 if fisher is None else 0.5 * (fisher * per_row).sum().item() / n
        return SensitivityRow(name, label, nbytes, w.numel(), error, error / reference if reference > 0 else 0.0, loss)

    @property
    def report(self) -> SensitivityReport:
        return SensitivityReport(list(self._rows), self.options, self.method)

    def recipe_args(self) -> dict:
        return {**super().recipe_args(), "options": self._given_options, "method": self.method,
                "group_size": self.group_size, "block_size": self.block_size, "dampening_frac": self.dampening_frac}


def _loss_backward(model: nn.Module, sample: dict) -> int:
    """Backward of the summed next-token loss of one sample (padding masked out). The body runs
    once; the LM head and loss run LOSS_CHUNK_TOKENS tokens at a time on its detached output, whose
    gradient then goes back through the body in one pass. -> tokens scored"""
    ids, mask = sample["input_ids"], sample.get("attention_mask")
    labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
    target = labels[:, 1:].reshape(-1)
    scored = int((target != -100).sum())
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(body, nn.Module) or body is model or not isinstance(head, nn.Linear) \
            or any(getattr(config, k, None) for k in _LOGIT_TRANSFORMS):
        logits = model(**sample, use_cache=False).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100,
                                          reduction="sum").backward()
        return scored
    hidden = body(**sample, use_cache=False).last_hidden_state
    leaf = hidden.detach()[:, :-1].reshape(-1, hidden.shape[-1]).requires_grad_(True)
    for start in range(0, leaf.shape[0], LOSS_CHUNK_TOKENS):
        part = slice(start, start + LOSS_CHUNK_TOKENS)
        torch.nn.functional.cross_entropy(head(leaf[part]).float(), target[part], ignore_index=-100,
                                          reduction="sum").backward()
    grad = torch.zeros_like(hidden)
    grad[:, :-1] = leaf.grad.view(hidden.shape[0], -1, hidden.shape[-1])
    hidden.backward(grad)
    return scored
