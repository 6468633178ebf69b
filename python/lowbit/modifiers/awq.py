"""AWQModifier: activation-aware scaling (and clipping) folded into the float model, before a
quantizing modifier rounds it; llmcompressor's arguments, lowbit's C++ searches."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import functional as F
from ..schemes import GGUFScheme, QuantizationArgs
from ..targets import matches
from .base import Modifier, in_layer
from .observers import reduce_average_pair
from .quantization import QuantizationModifier
from .scaling import architecture_mappings, fold_scales, nearest_balance_layers, output_width

logger = logging.getLogger("lowbit")


@dataclass
class AWQMapping:
    """smooth_layer's output is the input of balance_layers: scaling that output down by s
    and the balance layers' input columns up by s leaves the model unchanged."""

    smooth_layer: str
    balance_layers: List[str]


# llmcompressor's default mappings, which fit Llama, Mistral, Qwen2 and Qwen3 decoder layers.
DEFAULT_MAPPINGS = [
    AWQMapping("re:.*input_layernorm$", ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    AWQMapping("re:.*v_proj$", ["re:.*o_proj$"]),
    AWQMapping("re:.*post_attention_layernorm$", ["re:.*gate_proj$", "re:.*up_proj$"]),
    AWQMapping("re:.*up_proj$", ["re:.*down_proj$"]),
]
MAPPINGS_BY_ARCHITECTURE = {arch: DEFAULT_MAPPINGS for arch in (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}

# Original AWQ leaves the query and key projections unclipped: their outputs meet in a
# softmax, where a per-layer output error says little.
NO_CLIP = re.compile(r"(^|\.)(q_proj|k_proj|query|key|qkv_proj|Wqkv)$")


@dataclass
class _Mapping:
    """A mapping resolved inside one decoder layer."""

    smooth_name: str
    smooth: nn.Module
    balance_names: List[str]
    balance: List[nn.Module]
    stats: Optional[torch.Tensor] = None  # sum of |x| per channel (float64)
    tokens: int = 0
    gram: Optional[torch.Tensor] = None   # 2/n X^T X of the balance layers' input (upper triangle while streaming)


def _parse_mapping(m) -> AWQMapping:
    if isinstance(m, AWQMapping):
        return m
    if isinstance(m, dict) and set(m) >= {"smooth_layer", "balance_layers"}:
        return AWQMapping(m["smooth_layer"], list(m["balance_layers"]))
    if isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[0], str):
        return AWQMapping(m[0], [m[1]] if isinstance(m[1], str) else list(m[1]))
    raise ValueError(f"an AWQ mapping must be {{'smooth_layer': 're:.*input_layernorm$', 'balance_layers': "
                     f"['re:.*q_proj$', ...]}} (or an AWQMapping, or a (smooth, [balance...]) pair), got {m!r}")


class AWQModifier(Modifier):
    """AWQ (Lin et al., 2023): per decoder layer, find per-channel scales s for each mapping
    (smooth layer -> balance layers) on a grid of n_grid ratios, fold them into the model
    (smooth layer's output / s, balance layers' input columns * s: the float model is
    unchanged), then, with clip=True, clip each quantized non-q/k balance layer's groups to
    the bound (absmax * (1 - i / n_grid), i < max_shrink * n_grid) that minimises its output
    error. Both searches score the output error of the balance layers on every calibration
    token, through the Gram matrix of their input (C++ kernels).

    As in llmcompressor, AWQ only transforms: a QuantizationModifier in the same recipe
    quantizes (without one, W4A16_ASYM on every Linear but lm_head), and the search uses that
    modifier's weight scheme. The older one-modifier form AWQModifier(scheme=..., targets=...,
    ignore=...) adds that QuantizationModifier itself. Inputs to the next decoder layer come
    from the unquantized layer. mappings: None (inferred for Llama, Mistral, Qwen2, Qwen3),
    or a list of {'smooth_layer': 're:...', 'balance_layers': ['re:...', ...]}.
    offload_device is accepted for recipe compatibility (everything lives in main memory)."""

    requires_calibration = True
    propagates_float_outputs = True
    transforms_layers = True

    def __init__(self, mappings: Optional[Sequence] = None, duo_scaling: Union[bool, str] = True, n_grid: int = 20,
                 clip: bool = True, max_shrink: float = 0.5, offload_device=None, scheme=None,
                 config_groups: Optional[dict] = None, targets: Union[str, Sequence[str]] = "Linear", ignore=None):
        super().__init__(targets, ignore)
        F.awq_grid(duo_scaling, n_grid)  # validates both
        if not 0 <= max_shrink < 1:
            raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
        self.mappings = None if mappings is None else [_parse_mapping(m) for m in mappings]
        self.duo_scaling, self.n_grid, self.clip, self.max_shrink = duo_scaling, n_grid, clip, max_shrink
        self.offload_device = offload_device
        # The one-modifier form: a companion QuantizationModifier quantizes (see expand()).
        self._quantizer = None
        if scheme is not None or config_groups is not None:
            self._quantizer = QuantizationModifier(scheme=scheme, config_groups=config_groups, targets=targets,
                                                   ignore=ignore)
        self._layer: Dict[str, List[_Mapping]] = {}
        self._clip_grams: Dict[str, Tuple[torch.Tensor, int]] = {}
        self.chosen: Dict[str, Tuple[float, bool]] = {}  # smooth layer name -> (ratio, duo scaling)

    def expand(self) -> List[Modifier]:
        return [self] if self._quantizer is None else [self, self._quantizer]

    # -- mapping resolution -------------------------------------------------------------

    def _mappings_for(self, model: nn.Module) -> List[AWQMapping]:
        if self.mappings is not None:
            return self.mappings
        found = architecture_mappings(model, MAPPINGS_BY_ARCHITECTURE)
        if found is not None:
            return found
        raise ValueError(
            f"AWQModifier has no default mappings for {type(model).__name__} (known: "
            f"{', '.join(sorted(MAPPINGS_BY_ARCHITECTURE))}); pass them, for example AWQModifier(mappings=["
            "{'smooth_layer': 're:.*input_layernorm$', 'balance_layers': ['re:.*q_proj$', 're:.*k_proj$', "
            "'re:.*v_proj$']}, {'smooth_layer': 're:.*post_attention_layernorm$', 'balance_layers': "
            "['re:.*gate_proj$', 're:.*up_proj$']}, {'smooth_layer': 're:.*up_proj$', 'balance_layers': "
            "['re:.*down_proj$']}]) with your model's module names (print(model) shows them)")

    def _resolve(self, mapping: AWQMapping, modules: Dict[str, nn.Module]) -> Tuple[List[_Mapping], bool]:
        """(the usable (smooth, balance) pairs of `mapping` among `modules`, whether any matched)."""
        resolved, matched = [], False
        for smooth_name, smooth in modules.items():
            if not matches(mapping.smooth_layer, smooth_name, smooth):
                continue
            names = nearest_balance_layers(mapping.balance_layers, smooth_name, modules)
            if not names:
                continue
            matched = True
            balance = [modules[n] for n in names]
            width = output_width(smooth)
            if width is None:
                raise TypeError(f"AWQ cannot fold scales into {smooth_name} ({type(smooth).__name__}): the smooth "
                                "layer must be a Linear or a norm with a per-channel weight")
            if any(not isinstance(b, nn.Linear) or b.in_features != width for b in balance):
                continue  # e.g. v_proj -> o_proj under grouped-query attention: the widths differ
            resolved.append(_Mapping(smooth_name, smooth, names, balance))
        return resolved, matched

    def prepare(self, model: nn.Module, layer_names: Sequence[str], plan) -> None:
        """Resolve the mappings in each decoder layer, once, before calibration."""
        mappings = self._mappings_for(model)
        modules = dict(model.named_modules())
        matched, skipped = set(), {}
        for prefix in layer_names:
            local = {n: m for n, m in modules.items() if n.startswith(prefix + ".")}
            self._layer[prefix] = []
            for i, mapping in enumerate(mappings):
                resolved, any_match = self._resolve(mapping, local)
                if any_match:
                    matched.add(i)
                for r in resolved:
                    if any(n in plan for n in r.balance_names):
                        self._layer[prefix].append(r)
                    else:
                        skipped[mapping.smooth_layer] = "its balance layers are not quantized"
                if any_match and not resolved:
                    skipped.setdefault(mapping.smooth_layer, "the layer shapes do not match (grouped-query attention?)")
        for pattern, why in skipped.items():
            logger.info("AWQ: mapping %s skipped where %s", pattern, why)
        unmatched = [m for i, m in enumerate(mappings) if i not in matched]
        if self.mappings is not None and unmatched:
            raise ValueError(f"AWQ mapping(s) {unmatched} match no (smooth layer, balance layers) pair inside the "
                             "decoder layers; check the module names (print(model) shows them)")
        if not any(self._layer.values()):
            raise ValueError("AWQModifier found nothing to scale: no mapping has a quantized balance layer; add a "
                             "QuantizationModifier (or pass scheme=) that targets those layers")

    # -- calibration --------------------------------------------------------------------

    def layer_hooks(self, prefix: str, layer: nn.Module, plan) -> list:
        """Hooks that gather each mapping's statistics (mean |x|, Gram matrix) and, for
        clipping, the Gram matrix of every other quantized Linear in the layer."""
        handles = []
        covered = set()
        for m in self._layer.get(prefix, []):
            def stats(mod, args, m=m):
                x = args[0].detach()
                m.stats, _ = F.awq_channel_stats(x, m.stats, m.tokens)
                m.gram, m.tokens = F.hessian(x, m.gram, m.tokens, mirror=False)
            handles.append(m.balance[0].register_forward_pre_hook(stats))
            covered.update(m.balance_names)
        if self.clip:
            for name, (module, _) in plan.items():
                if name.startswith(prefix + ".") and name not in covered and not NO_CLIP.search(name) \
                        and isinstance(module, nn.Linear):
                    def gram(mod, args, name=name):
                        h, n = self._clip_grams.get(name, (None, 0))
                        self._clip_grams[name] = F.hessian(args[0].detach(), h, n, mirror=False)
                    handles.append(module.register_forward_pre_hook(gram))
        return handles

    def reduce_statistics(self, group, prefix: str) -> None:
        """Each mapping's |x| sums and Gram matrix, and the clipping Gram matrices, over every
        rank's tokens."""
        for m in self._layer.get(prefix, []):
            if m.gram is None:
                continue
            m.gram, m.tokens = reduce_average_pair(group, (m.gram, m.tokens), f"AWQ {m.smooth_name} Gram matrix")
            m.stats = group.sum_(m.stats, f"AWQ {m.smooth_name} |x|")  # a plain sum: the count is reduced above
        for name in in_layer(self._clip_grams, prefix):
            self._clip_grams[name] = reduce_average_pair(group, self._clip_grams[name], f"AWQ {name} Gram matrix")

    def transform_layer(self, prefix: str, layer: nn.Module, plan) -> None:
        """Search and fold each mapping's scales (in order), then clip."""
        to_clip = []
        for m in self._layer.get(prefix, []):
            if m.gram is None:
                raise ValueError(f"AWQ: {m.balance_names[0]} saw no calibration data")
            F.mirror_hessian_(m.gram)
            args = _weight_args(m, plan)
            weight = torch.cat([b.weight.detach().float() for n, b in zip(m.balance_names, m.balance) if n in plan])
            result = F.awq_search(weight, m.gram, (m.stats / m.tokens).float(), bits=args.num_bits,
                                  group_size=args.group_size if args.strategy == "group" else None,
                                  symmetric=args.symmetric, duo_scaling=self.duo_scaling, n_grid=self.n_grid)
            best = min(result.losses)
            logger.info("%s -> %s: ratio %.3f%s, output error %.4g (unscaled %.4g)", m.smooth_name,
                        ", ".join(n.rsplit(".", 1)[-1] for n in m.balance_names), result.ratio,
                        " duo" if result.duo_scaling else "", best, result.identity_loss)
            self.chosen[m.smooth_name] = (result.ratio, result.duo_scaling)
            fold_scales(m.smooth, m.balance, result.scales)
            if self.clip:
                gram = m.gram / (result.scales[:, None] * result.scales[None, :])
                to_clip += [(n, b, gram) for n, b in zip(m.balance_names, m.balance)
                            if n in plan and not NO_CLIP.search(n)]
            m.stats = m.gram = None
        for name in [n for n in self._clip_grams if n.startswith(prefix + ".")]:
            gram, _ = self._clip_grams.pop(name)
            to_clip.append((name, plan[name][0], F.mirror_hessian_(gram)))
        for name, module, gram in to_clip:
            scheme = plan[name][1]
            self._clip(name, module, gram, scheme.search_args if isinstance(scheme, GGUFScheme) else scheme.weights)

    def _clip(self, name: str, module: nn.Linear, gram: torch.Tensor, args: QuantizationArgs) -> None:
        if args.strategy not in ("group", "channel"):
            return
        w = module.weight.data
        gs = args.group_size if args.strategy == "group" else w.shape[1]
        bound = F.awq_clip(w, gram, bits=args.num_bits, group_size=gs, symmetric=args.symmetric,
                           n_grid=self.n_grid, max_shrink=self.max_shrink)
        b = bound.repeat_interleave(gs, dim=1).to(w.dtype)
        torch.minimum(torch.maximum(w, -b), b, out=w)

    def recipe_args(self) -> dict:
        args = {"duo_scaling": self.duo_scaling, "n_grid": self.n_grid, "clip": self.clip,
                "max_shrink": self.max_shrink}
        if self.mappings is not None:
            args["mappings"] = [{"smooth_layer": m.smooth_layer, "balance_layers": m.balance_layers}
                                for m in self.mappings]
        return args


def _weight_args(m: _Mapping, plan) -> QuantizationArgs:
    schemes = [plan[n][1] for n in m.balance_names if n in plan]
    if all(isinstance(s, GGUFScheme) for s in schemes):
        # llama.cpp's mixes give q / k / v (gate / up) different types: search on the coarsest grid
        return min((s.search_args for s in schemes), key=lambda a: a.num_bits)
    args = {s.weights for s in schemes}
    if len(args) > 1:
        raise ValueError(f"AWQ: {', '.join(m.balance_names)} share one input but are quantized with different "
                         "weight schemes; AWQ searches one scale for them: give them the same scheme")
    (a,) = args
    if a.strategy not in ("group", "channel"):
        raise ValueError(f"AWQ searches per-group or per-channel weight quantization; {m.balance_names[0]} uses "
                         f"strategy {a.strategy!r}")
    return a
