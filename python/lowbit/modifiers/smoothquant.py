"""SmoothQuantModifier: activation outliers moved into the weights (Xiao et al., 2022), as
llmcompressor runs it; folded into the float model before a quantizing modifier rounds it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import functional as F
from ..targets import as_list, matches
from .base import Modifier
from .scaling import architecture_mappings, fold_scales, nearest_balance_layers, output_width

logger = logging.getLogger("lowbit")

# llmcompressor's floor on the smoothing scales.
MINIMUM_SMOOTHING_SCALE = 1e-5
ALGORITHMS = ("smoothquant", "log_equalization")


@dataclass
class SmoothQuantMapping:
    """The output of smooth_layers (a norm, or a Linear) is the input of balance_layers (llmcompressor's LayerMap)."""

    balance_layers: List[str]
    smooth_layers: str


# llmcompressor's default mappings (no v -> o, no up -> down: those inputs stay unsmoothed).
DEFAULT_MAPPINGS = [
    SmoothQuantMapping(["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"),
    SmoothQuantMapping(["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"),
]
MAPPINGS_BY_ARCHITECTURE = {arch: DEFAULT_MAPPINGS for arch in (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}


def _parse_mapping(m) -> SmoothQuantMapping:
    if isinstance(m, SmoothQuantMapping):
        return m
    if isinstance(m, dict) and set(m) == {"balance_layers", "smooth_layers"}:
        m = (m["balance_layers"], m["smooth_layers"])
    if isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[1], str):  # llmcompressor: [[balance...], smooth]
        return SmoothQuantMapping(as_list(m[0], "balance_layers"), m[1])
    raise ValueError(f"a SmoothQuant mapping is [[balance layer patterns...], smooth layer pattern], e.g. "
                     f"[['re:.*q_proj', 're:.*k_proj', 're:.*v_proj'], 're:.*input_layernorm'], got {m!r}")


@dataclass
class _Resolved:
    smooth_name: str
    smooth: nn.Module
    balance_names: List[str]
    balance: List[nn.Linear]
    mins: Optional[torch.Tensor] = None  # running per-channel min / max of smooth's output (fp32)
    maxs: Optional[torch.Tensor] = None
    samples: int = 0


class SmoothQuantModifier(Modifier):
    """SmoothQuant: per channel j of each smooth layer's output, s_j = act_j^a / w_j^(1-a), with
    act_j the range (max - min) of that channel over the calibration tokens and w_j = 2 max over
    the balance layers of |W[:, j]| (s_j = act_j where w_j = 0; s >= 1e-5), folded exactly:
    the smooth layer's output is divided by s, the balance layers' input columns multiplied by
    it. algorithm="log_equalization": s = act / log2(2 + act).

    smoothing_strength a in [0, 1]; mappings: None (inferred for Llama, Mistral, Qwen2, Qwen3)
    or llmcompressor's [[balance patterns...], smooth pattern] list; ignore: a mapping is
    skipped when its smooth layer and all its balance layers are ignored;
    num_calibration_steps: only the first that many samples feed the ranges. It transforms
    only: quantizing modifiers later in the recipe see the smoothed layers (and their
    calibration statistics are gathered on the smoothed inputs). As with AWQ, every layer of
    the pass is fed the float model's activations.
    """

    requires_calibration = True
    transforms_layers = True
    # Each layer's ranges come from the float (smoothed) model's activations, as in llmcompressor,
    # whose propagation pass runs with quantization disabled. Measured on SmolLM2 W8A8 (alpha 0.8):
    # perplexity 24.596 this way, 24.648 from the quantized layers' outputs.
    propagates_float_outputs = True

    def __init__(self, smoothing_strength: float = 0.5, mappings: Optional[Sequence] = None, ignore=None,
                 num_calibration_steps: Optional[int] = None, calibration_function=None,
                 algorithm: str = "smoothquant"):
        super().__init__("Linear", ignore)
        if isinstance(smoothing_strength, bool) or not isinstance(smoothing_strength, (int, float)) \
                or not 0 <= smoothing_strength <= 1:
            raise ValueError(f"smoothing_strength must be a number in [0, 1] (the migration strength alpha; "
                             f"llmcompressor's W8A8 example uses 0.8), got {smoothing_strength!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if num_calibration_steps is not None and (isinstance(num_calibration_steps, bool)
                                                  or not isinstance(num_calibration_steps, int)
                                                  or num_calibration_steps <= 0):
            raise ValueError(f"num_calibration_steps must be a positive integer or None, got {num_calibration_steps!r}")
        if calibration_function is not None:
            raise ValueError("calibration_function is not supported: lowbit runs each decoder layer's own forward "
                             "on the calibration data")
        self.smoothing_strength, self.algorithm = float(smoothing_strength), algorithm
        self.mappings = None if mappings is None else [_parse_mapping(m) for m in mappings]
        self.num_calibration_steps = num_calibration_steps
        self._layer: Dict[str, List[_Resolved]] = {}
        self.scales: Dict[str, torch.Tensor] = {}  # smooth layer name -> the scales folded in

    def _mappings_for(self, model: nn.Module) -> List[SmoothQuantMapping]:
        if self.mappings is not None:
            return self.mappings
        found = architecture_mappings(model, MAPPINGS_BY_ARCHITECTURE)
        if found is not None:
            return found
        raise ValueError(
            f"SmoothQuantModifier has no default mappings for {type(model).__name__} (known: "
            f"{', '.join(sorted(MAPPINGS_BY_ARCHITECTURE))}); pass them as [[balance layers...], smooth layer] "
            "pairs, e.g. SmoothQuantModifier(mappings=[[['re:.*q_proj', 're:.*k_proj', 're:.*v_proj'], "
            "'re:.*input_layernorm'], [['re:.*fc1'], 're:.*final_layer_norm']]) with your model's module names "
            "(print(model) shows them)")

    def _ignored(self, name: str, module: nn.Module) -> bool:
        return any(matches(p, name, module) for p in self.ignore)

    def prepare(self, model: nn.Module, layer_names: Sequence[str], plan) -> None:
        """Resolve the mappings inside each decoder layer, once, before calibration."""
        mappings = self._mappings_for(model)
        modules = dict(model.named_modules())
        matched = set()
        for prefix in layer_names:
            local = {n: m for n, m in modules.items() if n.startswith(prefix + ".")}
            self._layer[prefix] = []
            for i, mapping in enumerate(mappings):
                for smooth_name, smooth in local.items():
                    if not matches(mapping.smooth_layers, smooth_name, smooth):
                        continue
                    names = nearest_balance_layers(mapping.balance_layers, smooth_name, local)
                    if not names:
                        continue
                    matched.add(i)
                    balance = [local[n] for n in names]
                    if self._ignored(smooth_name, smooth) and all(self._ignored(n, b) for n, b in zip(names, balance)):
                        continue
                    self._layer[prefix].append(self._check(smooth_name, smooth, names, balance))
        unmatched = [m for i, m in enumerate(mappings) if i not in matched]
        if unmatched:
            raise ValueError(f"SmoothQuant mapping(s) {unmatched} match no (balance layers, smooth layer) set inside "
                             "the decoder layers; check the module names (print(model) shows them)")

    @staticmethod
    def _check(smooth_name, smooth, names, balance) -> _Resolved:
        width = output_width(smooth)
        if width is None:
            raise TypeError(f"SmoothQuant cannot fold scales into {smooth_name} ({type(smooth).__name__}): the smooth "
                            "layer must be a Linear or a norm with a per-channel weight")
        bad = [n for n, b in zip(names, balance) if not isinstance(b, nn.Linear) or b.in_features != width]
        if bad:
            raise ValueError(f"SmoothQuant: {bad[0]} does not take {smooth_name}'s {width} output channels as its "
                             "input; a mapping's balance layers must read the smooth layer's output")
        return _Resolved(smooth_name, smooth, names, balance)

    def layer_hooks(self, prefix: str, layer: nn.Module, plan) -> list:
        """The range of each smooth layer's output channels (lowbit's streaming C++ min / max)."""
        handles = []
        for m in self._layer.get(prefix, []):
            def observe(mod, args, out, m=m):
                if self.num_calibration_steps is not None and m.samples >= self.num_calibration_steps:
                    return
                out = out[0] if isinstance(out, tuple) else out
                try:
                    m.mins, m.maxs = F.channel_range(out.detach(), m.mins, m.maxs)
                except ValueError as e:
                    raise ValueError(f"SmoothQuant, {m.smooth_name}: {e}") from None
                m.samples += 1
            handles.append(m.smooth.register_forward_hook(observe))
        return handles

    def check_distributed(self) -> None:
        if self.num_calibration_steps is not None:
            raise ValueError("SmoothQuantModifier(num_calibration_steps=...) counts the first samples of one process; "
                             "across processes leave it unset (every sample is used)")

    def reduce_statistics(self, group, prefix: str) -> None:
        """Each smooth layer's per-channel range over every rank's tokens."""
        for m in self._layer.get(prefix, []):
            if m.mins is not None:
                m.mins = group.min_(m.mins, f"SmoothQuant {m.smooth_name} range")
                m.maxs = group.max_(m.maxs, f"SmoothQuant {m.smooth_name} range")

    def smoothing_scales(self, m: _Resolved) -> torch.Tensor:
        act = (m.maxs - m.mins).float()
        if self.algorithm == "log_equalization":
            scales = act / torch.log2(2 + act)
        else:
            w = 2.0 * torch.stack([b.weight.detach().abs().amax(dim=0).float() for b in m.balance]).amax(dim=0)
            a = self.smoothing_strength
            scales = torch.where(w > 0, act.pow(a) / w.pow(1 - a), act)
        return scales.clamp_min(MINIMUM_SMOOTHING_SCALE)

    @torch.no_grad()
    def transform_layer(self, prefix: str, layer: nn.Module, plan) -> None:
        for m in self._layer.get(prefix, []):
            if m.mins is None:
                raise ValueError(f"SmoothQuant: {m.smooth_name} saw no calibration data")
            scales = self.smoothing_scales(m)
            fold_scales(m.smooth, m.balance, scales)
            self.scales[m.smooth_name] = scales
            logger.info("SmoothQuant %s -> %s: scales in [%.3g, %.3g]", m.smooth_name,
                        ", ".join(n.rsplit(".", 1)[-1] for n in m.balance_names), scales.min(), scales.max())
            m.mins = m.maxs = None

    def recipe_args(self) -> dict:
        args = {"smoothing_strength": self.smoothing_strength, "ignore": self.ignore}
        if self.mappings is not None:
            args["mappings"] = [[m.balance_layers, m.smooth_layers] for m in self.mappings]
        if self.algorithm != "smoothquant":
            args["algorithm"] = self.algorithm
        if self.num_calibration_steps is not None:
            args["num_calibration_steps"] = self.num_calibration_steps
        return args
