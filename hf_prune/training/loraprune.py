"""LoRAPrune (Zhang et al., 2023): heads and MLP channels removed during LoRA training, ranked by importance
measured without base-weight gradients, then cut out physically at the end of training.

Use it on a `peft.PeftModel` with plain LoRA adapters::

    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    Trainer(model=pm, args=args, train_dataset=ds,
            callbacks=[PruningCallback(PruningConfig(method="loraprune", sparsity=0.2,
                                                     start_step=20, end_step=160, update_every=10))]).train()
    merged = pm.merge_and_unload()          # a physically smaller model; save_pretrained / from_pretrained as
                                            # after hf_prune's other width methods

What happens, per optimizer step (`PruningCallback` drives it):

* importance, ``loraprune_importance="fisher"`` (the default): each unit's output gate ``m`` (an MLP channel at the
  ``down_proj`` input, a head's ``head_dim`` channels at the ``o_proj`` input, a kv group's heads together) gets
  ``dL/dm = sum_t x_t * dL/dx_t`` per sequence (a pass-through autograd function on that input, which saves
  nothing LoRA does not already keep and sums in float32; OPT's flattened ``[tokens, channels]`` MLP input is
  split by the block's batch size, and a packed single row counts as one sequence), and the step's score is the sum
  over sequences of its square: the empirical Fisher of the gate (Kwon et al., 2022, "A Fast Post-Training
  Pruning Framework for Transformers"): with the Fisher standing in for the Hessian, the second-order estimate
  of the loss increase when the unit is removed is half of it. The backward pass of LoRA training computes ``dL/dx`` anyway, so it costs ``O(tokens x channels)``
  per step and no ``[out, in]`` matrix; it is summed over processes under DDP and folded into the moving average
  below. Only the kinds ``width_units`` prunes are measured. Checkpoints record which ranking made the moving
  average; resuming with the other one is refused. Under fp16 the scores are divided by the GradScaler's scale
  squared (the optimizer's ``scaler``, as accelerate wraps it), and an overflow step is skipped. On SmolLM2-135M it ranks units like true-gradient Taylor importance with Spearman 0.83-0.94, against
  0.58-0.79 for the paper's estimate, and prunes better (benchmarks/README.md, "LoRAPrune");
* importance, ``loraprune_importance="lora"`` (the paper): every LoRA layer's ``I = |G_hat ⊙ (W + s B A)|``
  (`hf_prune.training.lora_importance`) is summed over
  the same dependency groups as the Taylor width method (`hf_prune.structure.units`: an MLP channel is its
  gate/up rows and down column; a query head its q rows and o columns; a kv group adds its k and v rows), and
  folded into a moving average ``I <- beta I + (1 - beta) I_step`` (``loraprune_beta=0.9``). Projections without
  a LoRA adapter add nothing (LoRA on every projection, ``target_modules="all-linear"``, is what the paper does).
  ``loraprune_average="gradient"`` averages the LoRA gradients ``G_A``, ``G_B`` instead and forms ``G_hat`` and
  ``I`` from the averages at each mask update: the absolute value comes after the average, as in one-shot
  Taylor's accumulated gradient, so per-step gradient noise does not add up into the score (and no ``[out, in]``
  matrix is formed between updates);
* masks: on update steps (``update_every``) the schedule (``schedule="cubic"`` from ``start_step``, the warm-up,
  to ``end_step``; the steps after ``end_step`` are the cool-down) gives the fraction of decoder-block parameters
  to remove, and `hf_prune.structure.allocate.allocate_width` picks the lowest-importance units (already removed
  units stay removed). Removed units are masked at their group's output: a forward pre-hook on the output
  projection (``o_proj``, ``down_proj``, ...) zeroes their input channels, for the base weight and the LoRA
  path alike;
* end of training: if the schedule had not reached ``sparsity`` (``end_step`` after ``max_steps``), the rest is
  removed at once, with a warning. The masked units are then cut out of the base model through the structured
  plan/surgery path (`hf_prune.structure.surgery.apply_plan`, config rewritten for reload), and the LoRA matrices
  are cut along with their layers (`hf_prune.peft.slicing`), so the `PeftModel` keeps training, saving and
  merging with stock peft. The callback's report is a `hf_prune.report.StructuredReport`.

Checkpoints hold the moving averages (and, with ``loraprune_average="gradient"``, the averaged LoRA gradients) and
the kept units; resume and 2-process DDP work as for the other training methods (the paper's estimate comes from
the all-reduced gradients, the Fisher is summed over the processes; rank 0's masks are broadcast). FSDP2 is
refused.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PruningConfig
from ..core.distributed import broadcast_object, is_dtensor, sum_across
from ..core.memory import lifetime_peak_rss_mb
from ..core.model import find_blocks
from ..errors import ConfigError, UnsupportedModelError
from ..registry import register_method
from ..report import StructuredReport
from ..structure.allocate import WidthScores, allocate_width
from ..structure.arch import block_specs, num_params
from ..structure.methods import unit_costs
from ..structure.plan import BlockSpec, LayerPlan, StructuredPlan
from ..structure.runner import block_rows
from ..structure.scores import head_channels, unit_terms
from ..structure.surgery import apply_plan, resolve_plan
from ..structure.units import attention_group_terms, mlp_group_terms, projection_cuts
from .lora_importance import lora_importance
from .methods import TrainingOnlyMethod
from .options import LoraPruneOptions
from .state import MaskState

logger = logging.getLogger("hf_prune")



def _peft_slicing() -> Any:
    try:
        from ..peft import slicing
    except ImportError:
        raise ConfigError("method='loraprune' trains with peft LoRA adapters: pip install 'peft>=0.21'") from None
    return slicing


class _FisherGate(torch.autograd.Function):
    """``x`` unchanged (a view, so nothing is copied or saved twice), with the gradient of a per-sequence gate
    ``m`` of ones (``[sequences, 1, channels]``) multiplying it: ``dL/dm = sum_t x * dL/dx``, in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (x,) = ctx.saved_tensors
        return grad, (x.float() * grad.float()).sum(-2, keepdim=True)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a `peft.PeftModel` (``model`` itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def adapter_pairs(wrapper: Any) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
    """``(adapter name, lora_A weight, lora_B weight)`` of a LoRA layer's active LoRA adapters."""
    for name in wrapper.active_adapters:
        if name in wrapper.lora_A:
            yield name, wrapper.lora_A[name].weight, wrapper.lora_B[name].weight


class LoraGroupTerms:
    """`hf_prune.structure.units.GroupTerms` over LoRA-estimated importances; each layer's ``[out, in]``
    importance is computed once per use (each step, or each mask update with averaged gradients) and dropped
    with `clear`.

    ``grads``: ``{path: {adapter: (G_A, G_B)}}`` to use instead of the adapters' ``.grad`` (averaged gradients)."""

    def __init__(self, wrappers: dict[str, Any],
                 grads: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None) -> None:
        self.wrappers = wrappers
        self.grads = grads
        self.cache: dict[str, torch.Tensor | None] = {}

    def importance(self, path: str) -> torch.Tensor | None:
        if path not in self.cache:
            self.cache[path] = self._compute(path)
        return self.cache[path]

    def _compute(self, path: str) -> torch.Tensor | None:
        w = self.wrappers.get(path)
        if w is None:
            return None
        base = w.get_base_layer()
        weight = base.weight.detach()
        if getattr(w, "fan_in_fan_out", False) or type(base).__name__ == "Conv1D":
            weight = weight.t()
        total = None
        for name, a, b in adapter_pairs(w):
            pair = (a.grad, b.grad) if self.grads is None else self.grads.get(path, {}).get(name, (None, None))
            if pair[0] is None or pair[1] is None:
                continue
            imp = lora_importance(weight, a, b, pair[0], pair[1], float(w.scaling[name]))
            total = imp if total is None else total + imp
        return total

    def terms(self, path: str, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        imp = self.importance(path)
        if imp is None:
            zeros = torch.zeros(index.shape[0])
            return zeros, zeros
        signed, absolute = unit_terms(imp, index, dim)
        return signed.cpu(), absolute.cpu()

    def clear(self) -> None:
        self.cache.clear()


@register_method("loraprune", options=LoraPruneOptions)
class LoraPrune(TrainingOnlyMethod):
    """LoRAPrune: structured pruning (heads, MLP channels) guided by LoRA gradients during LoRA training."""

    weight_masks: ClassVar[bool] = False  # units are masked at their group's output, not weight by weight

    def __init__(self, config: PruningConfig, masks: MaskState | None = None, end_step: int | None = None) -> None:
        super().__init__(config, masks, end_step)
        self.beta = float(config.loraprune_beta)
        self.average = str(config.loraprune_average)
        self.score = str(config.loraprune_importance)  # "lora" (the paper) | "fisher" (output-gate Fisher)
        # loraprune_importance="fisher": this optimizer step's sums {output path: {kind: sum of squared per-sequence
        # gate gradients}}, filled by tensor hooks during backward
        self.fisher: dict[str, dict[str, torch.Tensor]] = {}
        self.fisher_order: list[tuple[int, str, str, int]] | None = None  # `_fisher_layout`
        self.fisher_paths: set[str] = set()  # output projections whose units are pruned (and measured)
        self.batch = 0  # the batch size the decoder blocks last saw
        self.batch_hooks: list[Any] = []
        self.optimizer: Any = None  # the Trainer's (accelerate's carries the fp16 GradScaler)
        # loraprune_average="gradient": moving averages of the LoRA gradients {path: {adapter: (G_A, G_B)}}
        self.grad_ema: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.model: nn.Module | None = None  # the transformers model inside the PeftModel
        self.wrappers: dict[str, Any] = {}  # LoRA layers on the projections of the pruned groups
        self.swapped: dict[str, Any] = {}  # every outermost LoRA layer of the decoder blocks
        self.specs: list[BlockSpec] = []
        self.costs: dict[int, Any] = {}
        self.block_params: list[int] = []
        self.ema: dict[int, dict[str, torch.Tensor]] = {}
        self.plans: dict[int, LayerPlan] = {}
        self.gates: dict[str, torch.Tensor] = {}
        self.hooks: list[Any] = []
        self.steps_seen = 0
        self.removed_fraction = 0.0

    # ------------------------------------------------------------------ lifecycle
    def set_trainer(self, args: Any, optimizer: Any) -> None:
        self.optimizer = optimizer

    def attach(self, model: nn.Module) -> None:
        slicing = _peft_slicing()
        base = base_model_of(model)
        prefix, blocks = find_blocks(base)
        # the LoRA layers on plain linear / Conv1D projections of the decoder blocks (not nested parameter
        # wrappers on fused experts, not lm_head): these are swapped out to find the layout and cut at the end
        outer = {p: w for p, w in slicing.lora_wrappers(base, outermost=True).items()
                 if p.startswith(f"{prefix}.")}  # swapped out (with what they nest)
        wrappers = {p: w for p, w in outer.items() if slicing.is_projection(w)}
        if not wrappers:
            raise ConfigError(
                "method='loraprune' prunes heads and MLP channels while LoRA adapters on the decoder blocks train, "
                f"and this model ({type(model).__name__}) has none on the projections of its decoder blocks; wrap it "
                "first: "
                "peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules='all-linear')), and pass the "
                "PeftModel to the Trainer"
            )
        if any(is_dtensor(p) for p in base.parameters()):
            raise UnsupportedModelError("method='loraprune' does not support FSDP2-sharded models; train with DDP "
                                        "or on one process")
        with slicing.base_layers_in_place(base, outer):
            specs = block_specs(base)
            self.costs = {s.index: unit_costs(base, s) for s in specs}
            self.block_params = [num_params(b) for b in blocks]
        groups = self._check_coverage(specs, wrappers) if self.score == "lora" else self._group_paths(specs)
        wrappers = {p: w for p, w in wrappers.items() if p in groups}
        slicing.check_sliceable(wrappers)
        self.model, self.wrappers, self.specs, self.swapped = base, wrappers, specs, outer
        # output projection -> the attention spec whose heads it reads (None: an MLP's down projection)
        self.output_kinds: dict[str, Any] = {}
        units = self.config.width_units
        for spec in specs:
            if spec.mlp is not None:
                self.output_kinds[spec.mlp.output] = None
                if self.score == "fisher" and units in ("mlp", "both"):
                    self.fisher_paths.add(spec.mlp.output)
            if spec.attention is not None:
                self.output_kinds[spec.attention.o] = spec.attention
                if self.score == "fisher" and units in ("heads", "both"):
                    self.fisher_paths.add(spec.attention.o)
        for b in blocks:
            for key, fn in list(b._forward_pre_hooks.items()):
                if getattr(fn, "_hf_prune_batch", False):  # left by an interrupted run
                    del b._forward_pre_hooks[key]
            if self.score == "fisher":
                self.batch_hooks.append(b.register_forward_pre_hook(self._batch_hook(), with_kwargs=True))
        # what would fail mid-training fails now: the group terms (e.g. interleaved qkv with grouped kv heads)
        # and the final allocation (e.g. a sparsity the chosen width_units cannot reach)
        for spec in specs:
            self._group_scores(LoraGroupTerms({}), spec)
        self._allocate(float(self.config.sparsity))  # type: ignore[arg-type]
        for spec in specs:
            for path in self._outputs(spec):
                module = base.get_submodule(path)
                for key, fn in list(module._forward_pre_hooks.items()):
                    if getattr(fn, "_hf_prune_gate", False):  # left by an interrupted run
                        del module._forward_pre_hooks[key]
                self.hooks.append(module.register_forward_pre_hook(self._gate_hook(path)))

    def detach(self) -> None:
        for h in self.hooks + self.batch_hooks:
            h.remove()
        self.hooks, self.batch_hooks, self.gates = [], [], {}

    def _check_coverage(self, specs: list[BlockSpec], wrappers: dict[str, Any]) -> set[str]:
        """Refuse adapters that cover no unit kind being pruned; return the paths of every group projection."""
        units = self.config.width_units
        mlp_paths, head_paths = self._group_paths(specs, split=True)
        wanted = {"mlp": [("MLP channels", mlp_paths)], "heads": [("attention heads", head_paths)],
                  "both": [("MLP channels", mlp_paths), ("attention heads", head_paths)]}[units]
        missing = [what for what, paths in wanted if paths and not paths & set(wrappers)]  # (MoE: no dense MLP)
        partial = sorted(set().union(*(paths for _, paths in wanted)) - set(wrappers))
        if missing:
            raise ConfigError(
                f"method='loraprune' with width_units={units!r}: no LoRA adapter sits on a projection of the "
                f"{' or '.join(missing)} (LoRA on {', '.join(sorted(wrappers)[:3])}{'...' if len(wrappers) > 3 else ''}), "
                "so their importance cannot be estimated. "
                "Put LoRA on the attention and MLP projections (target_modules='all-linear'), or set width_units to "
                "what the adapters cover"
            )
        if partial:
            logger.warning("hf_prune: loraprune: %d projections of the pruned groups have no LoRA adapter (e.g. %s); "
                           "their weights add nothing to the importance. LoRA on every projection "
                           "(target_modules='all-linear') is what LoRAPrune assumes", len(partial), partial[0])
        return mlp_paths | head_paths

    @staticmethod
    def _group_paths(specs: list[BlockSpec], split: bool = False) -> Any:
        """The projections of the MLP channel groups and of the head groups (both sets with ``split``)."""
        mlp_paths = {p for s in specs if s.mlp is not None
                     for p in (*s.mlp.inputs, s.mlp.output, s.mlp.fused_gate_up) if p}
        head_paths = {p for s in specs if s.attention is not None
                      for p in (s.attention.q, s.attention.k, s.attention.v, s.attention.qkv, s.attention.o) if p}
        return (mlp_paths, head_paths) if split else mlp_paths | head_paths

    @staticmethod
    def _outputs(spec: BlockSpec) -> list[str]:
        out = []
        if spec.attention is not None:
            out.append(spec.attention.o)
        if spec.mlp is not None:
            out.append(spec.mlp.output)
        return out

    def _gate_hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args:
                return None
            gate = self.gates.get(path)
            x = args[0] if gate is None else args[0] * gate.to(device=args[0].device, dtype=args[0].dtype)
            if path in self.fisher_paths and torch.is_grad_enabled() and not self._final_chosen():
                x = self._fisher_gate(path, x)
            elif gate is None:
                return None
            return (x, *args[1:])

        hook._hf_prune_gate = True  # type: ignore[attr-defined]
        return hook

    def _batch_hook(self) -> Any:
        """A pre-hook remembering the batch size a decoder block sees, for projections that get
        ``[tokens, channels]``."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor) and h.dim() >= 3:
                self.batch = int(h.shape[0])

        hook._hf_prune_batch = True  # type: ignore[attr-defined]
        return hook

    def _fisher_gate(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` through `_FisherGate`, one gate per sequence: ``[batch, seq, C]`` as it comes; a flattened
        ``[batch * seq, C]`` (OPT's MLP) split by the block's batch size; otherwise one gate for all rows."""
        shape = x.shape
        if x.dim() >= 3:
            seqs = x.reshape(-1, shape[-2], shape[-1])
        elif self.batch and shape[0] % self.batch == 0:
            seqs = x.reshape(self.batch, -1, shape[-1])
        else:
            seqs = x.reshape(1, -1, shape[-1])
        m = torch.ones(seqs.shape[0], 1, shape[-1], device=x.device, requires_grad=True)
        m.register_hook(self._fisher_hook(path))
        return _FisherGate.apply(seqs, m).reshape(shape)

    def _fisher_hook(self, path: str) -> Any:
        """A hook on the gradient of the per-sequence gate ``m`` of output projection ``path``: adds each
        sequence's ``(dL/dm)^2`` per unit (an MLP channel; a query head's ``head_dim`` channels summed; a kv group's
        heads summed) to this step's sums, the empirical Fisher of the unit's gate."""
        kind = self.output_kinds[path]

        def hook(grad: torch.Tensor) -> None:
            d = grad.detach().float().reshape(-1, grad.shape[-1])  # [sequences, channels]
            if kind is not None and d.shape[-1] != kind.num_heads * kind.head_dim:
                raise UnsupportedModelError(f"loraprune_importance='fisher': the input of {path} has {d.shape[-1]} "
                                            f"channels, not heads x head_dim = {kind.num_heads * kind.head_dim}; "
                                            "use loraprune_importance='lora' for this model")
            held = self.fisher.setdefault(path, {})
            if kind is None:  # an MLP output projection
                parts = {"mlp": d}
            else:
                heads = d.reshape(d.shape[0], kind.num_heads, -1).sum(-1)
                parts = {"head": heads, "group": heads.reshape(d.shape[0], kind.num_kv_heads, -1).sum(-1)}
            for k, v in parts.items():
                sq = v.square().sum(0)
                held[k] = sq if k not in held else held[k] + sq

        return hook

    def begin(self, model: Any, calibration: Any = None, tokenizer: Any = None) -> bool:
        return False  # nothing is masked at the start

    # ------------------------------------------------------------------ importance
    @staticmethod
    def _group_scores(terms: LoraGroupTerms, spec: BlockSpec) -> dict[str, torch.Tensor]:
        now: dict[str, torch.Tensor] = {}
        if spec.mlp is not None:
            now["mlp"] = mlp_group_terms(terms, spec.mlp)[1]
        if spec.attention is not None:
            (_, heads), (_, kv) = attention_group_terms(terms, spec.attention)
            q = spec.attention.num_heads // spec.attention.num_kv_heads
            now["head"], now["group"] = heads, heads.view(-1, q).sum(1) + kv
        terms.clear()
        return now

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self._final_chosen():
            return  # no later update reads the importance
        if self.average == "gradient":
            self._average_gradients()
            return
        if self.score == "fisher":
            scores = self._fisher_scores()
            if not scores:
                return
        else:
            terms = LoraGroupTerms(self.wrappers)
            scores = {spec.index: self._group_scores(terms, spec) for spec in self.specs}
        if not all(bool(torch.isfinite(v).all()) for now in scores.values() for v in now.values()):
            logger.warning("hf_prune: loraprune: non-finite %s (an fp16 overflow step?); this step's importance is "
                           "skipped", "output-gate gradients" if self.score == "fisher" else "LoRA gradients")
            return
        for i, now in scores.items():
            ema = self.ema.setdefault(i, {})
            for kind, value in now.items():
                ema[kind] = self._fold(ema.get(kind), value)
        self.steps_seen += 1

    def _fisher_layout(self) -> list[tuple[int, str, str, int]]:
        """``(block, kind, output path, units)`` of every measured kind, in a fixed order (the same on every rank);
        built once."""
        if self.fisher_order is None:
            order = []
            for spec in self.specs:
                kinds = []
                if spec.mlp is not None:
                    kinds.append((spec.mlp.output, "mlp", spec.mlp.intermediate))
                if spec.attention is not None:
                    a = spec.attention
                    kinds += [(a.o, "head", a.num_heads), (a.o, "group", a.num_kv_heads)]
                order += [(spec.index, kind, path, int(n)) for path, kind, n in kinds if path in self.fisher_paths]
            self.fisher_order = order
        return self.fisher_order

    def _fisher_scores(self) -> dict[int, dict[str, torch.Tensor]]:
        """This step's output-gate Fisher per block and kind (summed over processes), and the sums reset."""
        layout = self._fisher_layout()
        held_any = [t for kinds in self.fisher.values() for t in kinds.values()]
        device = held_any[0].device if held_any else torch.device("cpu")
        values = []
        for _, kind, path, n in layout:
            held = self.fisher.get(path, {}).get(kind)
            values.append(torch.zeros(n, device=device) if held is None else held.to(device))  # same shapes on every rank
        self.fisher = {}
        if not values:
            return {}
        # concatenated on the device: one copy to the CPU (and one all-reduce under DDP), not one per block and kind
        (total,) = sum_across([torch.cat(values).float()])  # one all-reduce under DDP, on the device
        total = total.cpu()
        scaler = getattr(self.optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: the gate gradients are of the scaled loss
            total = total / float(scaler.get_scale()) ** 2
        if not bool(total.any()):  # no gate saw a gradient (nothing measured): not a measurement of zero
            logger.warning("hf_prune: loraprune: no output gate received a gradient this step (is the loss "
                           "backpropagated through the decoder blocks?); the step is left out of the importance")
            return {}
        scores: dict[int, dict[str, torch.Tensor]] = {}
        for (i, kind, _, _), v in zip(layout, total.split([n for *_, n in layout]), strict=True):
            scores.setdefault(i, {})[kind] = v
        return scores

    def _fold(self, old: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """One step of the moving average ``beta * old + (1 - beta) * value`` (``value`` itself at the first step,
        or where the shapes no longer match)."""
        if old is None or self.steps_seen == 0 or old.shape != value.shape:
            return value.clone()
        return self.beta * old.to(value.device) + (1 - self.beta) * value

    def _average_gradients(self) -> None:
        """``loraprune_average="gradient"``: fold this step's LoRA gradients into their moving averages."""
        now: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for path, w in self.wrappers.items():
            for name, a, b in adapter_pairs(w):
                if a.grad is not None and b.grad is not None:
                    now.setdefault(path, {})[name] = (a.grad.detach().float(), b.grad.detach().float())
        finite = [torch.isfinite(g).all() for pairs in now.values() for pair in pairs.values() for g in pair]
        if finite and not bool(torch.stack(finite).all()):  # one device sync
            logger.warning("hf_prune: loraprune: non-finite LoRA gradients (an fp16 overflow step?); this step is "
                           "left out of the averaged gradients")
            return
        for path, pairs in now.items():
            held = self.grad_ema.setdefault(path, {})
            for name, (ga, gb) in pairs.items():
                old_a, old_b = held.get(name, (None, None))
                held[name] = (self._fold(old_a, ga), self._fold(old_b, gb))
        self.steps_seen += 1

    def _refresh(self) -> None:
        """``loraprune_average="gradient"``: the group importance from the averaged gradients and today's A, B."""
        if self.average != "gradient" or not self.grad_ema:
            return
        terms = LoraGroupTerms(self.wrappers, grads=self.grad_ema)
        self.ema = {spec.index: self._group_scores(terms, spec) for spec in self.specs}

    def _final_chosen(self) -> bool:
        """Whether the schedule has reached the final sparsity: the units are chosen for good."""
        return self.target >= float(self.config.sparsity) - 1e-9  # type: ignore[arg-type]

    def importance(self) -> dict[int, dict[str, torch.Tensor]]:
        """The group importance the masks are chosen by: ``{block: {"mlp" | "head" | "group": scores}}`` (the
        moving averages; with ``loraprune_average="gradient"``, as formed at the last mask update)."""
        return {i: dict(v) for i, v in self.ema.items()}

    # ------------------------------------------------------------------ masks
    def update(self, step: int, optimizer: Any) -> bool:
        target = self.scheduled_target(step)
        if target is None:
            return False
        if target > 0 and self.steps_seen == 0:
            logger.warning("hf_prune: loraprune: update at step %d before any importance was measured; skipped "
                           "(start the schedule after a few steps: start_step > 0, initial_sparsity=0)", step)
            return False
        self.target = target
        self._refresh()
        self._install(broadcast_object(self._allocate(target)))
        if self._final_chosen():
            self.grad_ema = {}  # never read again
        return True

    def _allocate(self, fraction: float) -> dict[int, LayerPlan]:
        if fraction <= 0:
            return {}
        width: list[WidthScores] = []
        for spec in self.specs:
            c = self.costs[spec.index]
            ema, plan = self.ema.get(spec.index, {}), self.plans.get(spec.index, LayerPlan())
            kv = spec.attention.num_kv_heads if spec.attention is not None else 1
            mlp_s = self._scores(ema.get("mlp"), spec.mlp.intermediate if spec.mlp else 0, plan.mlp_keep)
            head_s = self._scores(ema.get("head"), spec.attention.num_heads if spec.attention else 0,
                                  plan.heads_keep)
            group_s = self._scores(ema.get("group"), kv if spec.attention else 0, plan.kv_heads_keep)
            width.append(WidthScores(spec.index, mlp_s, head_s, group_s, kv, c.mlp_channel, c.query_head,
                                     c.kv_group))
        cfg = self.config
        layers, _ = allocate_width(width, fraction * sum(self.block_params), cfg.allocation, cfg.gqa_mode,
                                   cfg.width_units, cfg.round_to, standardized=False)
        assert self.model is not None
        cuts, _ = resolve_plan(self.specs, StructuredPlan(layers=layers), self._hidden())
        by_index = {spec.index: spec for spec in self.specs}
        return {i: self._nested(by_index[i], self.plans.get(i), cuts.get(i)) for i in set(cuts) | set(self.plans)}

    def _hidden(self) -> int:
        assert self.model is not None
        return int(self.model.config.get_text_config(decoder=True).hidden_size)

    @staticmethod
    def _nested(spec: BlockSpec, old: LayerPlan | None, new: LayerPlan | None) -> LayerPlan:
        """What a block keeps after an update (both plans resolved): never a unit removed before. The allocation's
        per-block counts can shrink between updates (rounding; a budget already overshot), so each kind takes the
        smaller of its old and new keep lists; removed units score lowest, so the two are nested. (Were they
        not, the old list stays and the new removals wait for the next update.)"""
        old, new = old or LayerPlan(), new or LayerPlan()

        def smaller(a: list[int] | None, b: list[int] | None) -> list[int] | None:
            if a is None or b is None:
                return b if a is None else a
            return list(b) if set(b) <= set(a) else list(a)

        out = LayerPlan(mlp_keep=smaller(old.mlp_keep, new.mlp_keep), heads_keep=smaller(old.heads_keep,
                                                                                          new.heads_keep))
        if out.heads_keep is not None and spec.attention is not None:
            group = spec.attention.num_heads // spec.attention.num_kv_heads
            out.kv_heads_keep = sorted({h // group for h in out.heads_keep})
        return out

    @staticmethod
    def _scores(ema: torch.Tensor | None, n: int, keep: list[int] | None) -> torch.Tensor | None:
        """Scores for the allocation: the moving average, with units already removed at -1 (removed first)."""
        if n == 0:
            return None
        s = torch.zeros(n) if ema is None else ema.float().clone()
        if keep is not None:
            gone = torch.ones(n, dtype=torch.bool)
            gone[torch.tensor(keep, dtype=torch.long)] = False
            s[gone] = -1.0
        return s

    def _install(self, plans: dict[int, LayerPlan]) -> None:
        """Make ``plans`` the current masks: gates on the output projections' input channels."""
        cuts, _ = resolve_plan(self.specs, StructuredPlan(layers=plans), self._hidden())
        self.plans = cuts
        gates: dict[str, torch.Tensor] = {}
        removed = 0
        for spec in self.specs:
            cut = cuts.get(spec.index)
            if cut is None:
                continue
            c = self.costs[spec.index]
            a, m = spec.attention, spec.mlp
            if a is not None and cut.heads_keep is not None:
                gate = torch.zeros(a.num_heads * a.head_dim)
                gate[head_channels(cut.heads_keep, a.head_dim)] = 1.0
                gates[a.o] = gate
                removed += (a.num_heads - len(cut.heads_keep)) * c.query_head
                removed += (a.num_kv_heads - len(cut.kv_heads_keep or [])) * (c.kv_group - c.query_head * (
                    a.num_heads // a.num_kv_heads))
            if m is not None and cut.mlp_keep is not None:
                gate = torch.zeros(m.intermediate)
                gate[torch.tensor(cut.mlp_keep, dtype=torch.long)] = 1.0
                gates[m.output] = gate
                removed += (m.intermediate - len(cut.mlp_keep)) * c.mlp_channel
        self.gates = {path: gate.to(next(self.model.get_submodule(path).parameters()).device)
                      for path, gate in gates.items()}
        self.removed_fraction = removed / max(sum(self.block_params), 1)

    # ------------------------------------------------------------------ the end: physical removal
    def end(self, model: nn.Module) -> StructuredReport:
        """Remove the masked units from the base model and cut the adapters along (see the module docs)."""
        final = float(self.config.sparsity)  # type: ignore[arg-type]
        if self.target < final - 1e-9:
            warnings.warn(f"loraprune: training ended at scheduled sparsity {self.target:.3f} before the final "
                          f"{final} (end_step={self.end_step} is after the last step); the rest is removed now, "
                          "without recovery training. Set end_step before max_steps to leave a cool-down",
                          stacklevel=2)
            self._refresh()
            self._install(broadcast_object(self._allocate(final)))
            self.target = final
        self.detach()
        slicing = _peft_slicing()
        base = self.model
        assert base is not None
        start = time.perf_counter()
        with slicing.base_layers_in_place(base, self.swapped):
            params_before = num_params(base)
            plan = StructuredPlan(layers=self.plans)
            slices = {path: cut for spec in self.specs if spec.index in self.plans
                      for path, cut in projection_cuts(spec, self.plans[spec.index]).items()}
            removed = apply_plan(base, plan)
            params_after = num_params(base)
        for path, (rows, cols) in slices.items():
            if path in self.wrappers:
                slicing.slice_lora_(self.wrappers[path], rows, cols)
        cfg = self.config
        return StructuredReport(
            method=cfg.method, structure=cfg.structure, target_fraction=final,
            blocks=block_rows(self.specs, plan, self.block_params, removed), params_before=params_before,
            params_after=params_after, decoder_params_before=sum(self.block_params),
            seconds=time.perf_counter() - start, peak_rss_mb=lifetime_peak_rss_mb(),
            device=str(next(base.parameters()).device), kind="structured",
            reload_path="hf_prune" if _is_structured(base) else "stock",
            config={**cfg.to_dict(), "plan_info": {"importance_steps": self.steps_seen}},
        )

    # ------------------------------------------------------------------ logging and checkpoints
    def achieved(self) -> float:
        return self.removed_fraction

    def state(self) -> dict[str, Any]:
        plans = {str(i): {"mlp_keep": p.mlp_keep, "heads_keep": p.heads_keep, "kv_heads_keep": p.kv_heads_keep}
                 for i, p in self.plans.items()}
        return {**super().state(), "loraprune_steps": self.steps_seen, "plans": plans,
                "loraprune_importance": self.score}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"loraprune/{i}/{kind}": t for i, ema in self.ema.items() for kind, t in ema.items()}
        # loraprune_average="gradient": the averaged gradients the next update forms the group scores from
        out.update({f"loraprune_grad/{path}/{name}/{ab}": t.cpu() for path, pairs in self.grad_ema.items()
                    for name, pair in pairs.items() for ab, t in zip("ab", pair)})
        return out

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(meta, tensors)
        made_by = meta.get("loraprune_importance", "lora")  # checkpoints before the option: the paper's estimate
        if made_by != self.score and int(meta.get("loraprune_steps", 0)) > 0:
            raise ConfigError(f"this checkpoint's LoRAPrune importance was measured with loraprune_importance="
                              f"{made_by!r}, and this run uses {self.score!r}: the two scores are on different "
                              f"scales and cannot share one moving average. Resume with "
                              f"loraprune_importance={made_by!r}")
        self.steps_seen = int(meta.get("loraprune_steps", 0))
        self.ema, self.grad_ema = {}, {}
        grads: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("loraprune/"):
                _, i, kind = key.split("/")
                self.ema.setdefault(int(i), {})[kind] = t.float().cpu()
            elif key.startswith("loraprune_grad/"):
                path, rest = key[len("loraprune_grad/"):].split("/", 1)  # module paths have no "/"
                name, ab = rest.rsplit("/", 1)
                grads.setdefault((path, name), {})[ab] = t.float()
        for (path, name), pair in grads.items():
            w = self.wrappers.get(path)
            device = w.lora_A[name].weight.device if w is not None and name in w.lora_A else torch.device("cpu")
            self.grad_ema.setdefault(path, {})[name] = (pair["a"].to(device), pair["b"].to(device))
        plans = {int(i): LayerPlan(**p) for i, p in (meta.get("plans") or {}).items()}
        self._install(plans)


def _is_structured(model: nn.Module) -> bool:
    from ..structure.config_io import is_structured

    return bool(is_structured(model.config))
