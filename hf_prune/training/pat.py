"""Pruning-aware tuning (PAT, Liu et al., AAAI 2025): learn which hidden dimensions to drop while fine-tuning, then
remove them from every weight. The result has a smaller ``hidden_size`` and reloads with stock transformers.

    Trainer(model=model, args=args, train_dataset=ds,
            callbacks=[PruningCallback(PruningConfig(method="pat", sparsity=0.25))]).train()
    model.save_pretrained("out")     # SmolLM2: hidden_size 576 -> 432; AutoModelForCausalLM.from_pretrained("out")

What happens (`PruningCallback` drives it):

* ``Trainer(...)`` construction (``on_init_end``, before the optimizer exists): Hybrid Sparsification Modules
  (`hf_prune.training.hsm`) are attached, with forward hooks, after the embeddings and after every attention and MLP
  output projection, before the residual adds. They live in ``model.hf_prune_pat``, so the Trainer's optimizer
  trains their adapters and scales. The base weights of a plain model are frozen (``pat_train_base=False``, as in
  the paper); a `peft.PeftModel` keeps its LoRA adapters trainable. Tied embeddings get a diagonal HSM so they can
  stay tied (``pat_untie=True`` for a full one). The callback must be passed to ``Trainer(callbacks=[...])``; one
  added later finds no HSMs in the optimizer and stops with a message (or call `prepare` before building the
  Trainer);
* every forward in training: one shared mask ``sigmoid(T m) + bias`` scales every HSM's output; a forward hook on
  the model adds the mask loss and the identity loss (`hf_prune.training.hsm`) to ``outputs.loss``, so the
  Trainer's own loss path (and trl's ``SFTTrainer``) trains them (divided like the task loss under gradient
  accumulation);
* every optimizer step: the mask logits ``m`` take a step along their gradient. They have their own optimizer, not
  the Trainer's, so the user's learning rate and schedule do not set how fast dimensions are decided; ``T`` and
  ``bias`` follow the step;
* warm-up (``pat_warmup``, 5% of the steps): the mask is exactly 1 and forward pre-hooks on the hidden RMSNorms
  measure the residual stream's energy ``E[x_j²]`` per dimension on the training batches; the logits then start
  from its standardised logarithm. Why: which dimensions go matters more than anything else here. On SmolLM2
  (``benchmarks/results/pat.md``), dropping the 144 lowest-energy dimensions with no training gives PPL 190,
  random ones 18470, and 300 steps with logits learned from 0 as in the paper end at 323 (57-74 with the warm-up);
* the mask rule (``pat_mask_rule``). ``"topk"`` (default): the soft mask is ``sigmoid(T (m - θ) / σ) + bias``
  with ``θ`` the top-``K`` threshold of ``m`` and ``σ`` half the gap between the logits ranked 10% of ``d`` above
  and below it: exactly ``K`` dimensions lead at every step and the mask sharpens with ``T`` alone (about
  ``0.2 · 2.2 / T`` of the dimensions stay between 0.1 and 0.9), so there is no mask loss. A standard deviation
  instead of ``σ`` left 368 of 576 dimensions undecided the step before the freeze on SmolLM2 (a few far-out
  logits inflate it) and the loss jumped from 4.2 to 5.8 when the mask became hard. ``"count_loss"``: the paper's ``sigmoid(T m) + bias`` with its mask
  loss (straight-through count + polarisation). Either way ``m`` takes Adam steps of size ``pat_mask_lr`` along
  its gradient. Why the default differs: on SmolLM2 the paper's count term made the logits near the boundary
  oscillate (kept 380 -> 420 -> 430 -> 420) without polarising, and hardening at the freeze step raised the
  training loss from 3.9 to 5.8;
* after ``pat_freeze`` of the steps (0.8): the mask becomes hard, exactly the top ``K`` logits, ``K`` the kept
  hidden size rounded to ``pat_multiple`` (8), and is frozen; the remaining steps adapt to it;
* reader compensation (``pat_compensate``, on by default): the warm-up also sums ``uᵀu`` of every reader group's
  input ``u`` (the norm output that q/k/v, or gate/up, read). At the freeze, the least-squares map ``M`` of the
  kept dimensions onto the dropped ones (`hsm.fill_map`, ridge 1e-2) is solved per group, and from then on each
  reader sees its dropped input dimensions filled in as ``u_keep M`` instead of 0 (a forward pre-hook; the LoRA
  path sees the same input). At the end ``M`` is folded into the readers' weights (``w[:, keep] += w[:, drop] Mᵀ``,
  LoRA ``A`` too), so the saved model has the same shapes and still reloads with stock transformers. Why: on
  SmolLM2, without training, the fill halves the perplexity of the cut model (224 -> 124), and after 300 steps
  it ends at 49.7 instead of 57.3;
* distillation (``pat_distill``, off by default): adds ``pat_distill x KL(teacher || student)`` per token to the
  loss. The teacher is this same model with every HSM and fill bypassed and its LoRA adapters off (the model PAT
  started from, since its base weights stay frozen), run in eval mode without gradients on the same batch: one more
  forward per step, no second copy of the weights. On SmolLM2 it did not help at 300 steps (57.29 vs 57.34);
* end of training: every HSM, its scale included, is folded into the neighbouring weights and the dropped
  dimensions are cut from every weight (`hf_prune.structure.hidden.cut_hidden_`). The smaller model computes what
  the trained model with its hard mask computed. The callback's report is a `hf_prune.report.StructuredReport`
  (``structure="hidden"``).

Checkpoints hold the mask logits, the hard mask and every HSM tensor (a `peft.PeftModel` checkpoint holds only the
adapter), so ``resume_from_checkpoint`` continues exactly; a checkpoint without them is refused. Not supported:
FSDP2-sharded models, MoE, LayerNorm models (see `hf_prune.structure.hidden`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PruningConfig
from ..core.distributed import is_dtensor
from ..core.memory import lifetime_peak_rss_mb
from ..core.model import find_blocks
from ..errors import ConfigError, UnsupportedModelError
from ..registry import register_method
from ..report import BlockRow, StructuredReport
from ..structure.arch import num_params
from ..structure.hidden import HiddenLayout, check_cut_hidden, cut_hidden_, hidden_layout_with
from . import hsm as H
from .loraprune import base_model_of
from .methods import TrainingOnlyMethod
from .options import PatOptions
from .state import MaskState, world_size

logger = logging.getLogger("hf_prune")

ATTR = "hf_prune_pat"
LOG_KEPT = "prune/pat_kept_dims"
LOG_MASK_LOSS = "prune/pat_mask_loss"
LOG_IDENTITY = "prune/pat_identity_loss"
LOG_DISTILL = "prune/pat_distill_loss"
LOG_TEMPERATURE = "prune/pat_temperature"
LOG_UNDECIDED = "prune/pat_undecided"


def _lora_wrappers(model: nn.Module) -> dict[str, Any]:
    """The peft LoRA layers of ``model`` (empty without peft or adapters)."""
    if not any("lora_" in n for n, _ in model.named_parameters()):
        return {}
    from ..peft import slicing

    return slicing.lora_wrappers(model, outermost=True)


class PatModules(nn.Module):
    """The HSMs of one model and their shared mask: ``hsms[key]`` follows ``paths[key]``.

    ``logits`` (the mask logits ``m``) is a plain tensor, not a parameter, so the Trainer's optimizer does not
    update it (`PruningAwareTuning.before_optimizer_step` does); ``keep`` is the frozen hard mask once set.
    """

    def __init__(self, layout: HiddenLayout, rank: int, target: int, untie: bool, device: torch.device,
                 rule: str = "topk", devices: dict[str, torch.device] | None = None, compensate: bool = False) -> None:
        super().__init__()
        d = layout.hidden
        devices = devices or {}
        self.hidden, self.target, self.rule = d, target, rule
        self.paths: dict[str, str] = {"embed": layout.embed}
        hsms = {"embed": H.HybridSparsificationModule(d, 0 if layout.tied and not untie else rank).to(device)}
        for i, path in enumerate(layout.outputs):
            key = f"{'attn' if i % 2 == 0 else 'mlp'}_{i // 2}"
            self.paths[key] = path
            hsms[key] = H.HybridSparsificationModule(d, rank).to(devices.get(path, device))
        self.hsms = nn.ModuleDict(hsms)
        self.logits = torch.zeros(d, device=device, requires_grad=True)
        self.keep: torch.Tensor | None = None
        self.moments: torch.Tensor | None = None  # Adam's first and second moments of the logits
        self.adam_steps = 0
        self.temp, self.bias = 1.0, 0.5
        self.norm_paths = list(layout.norms)
        self.groups = [list(g) for g in layout.groups]
        self.compensate = compensate
        self.grams: list[torch.Tensor | None] | None = None  # warm-up: Σ uᵀu of each reader group's input u
        self.fills: list[torch.Tensor] | None = None  # after the freeze: u_drop ≈ u_keep M per reader group
        self.fill_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (kept, dropped) dimension indices
        # q/k/v share one input: fill it once (group, input, filled); cleared after every forward of the model
        self.fill_last: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.bypass = False  # every HSM passes its input through (the distillation teacher's forward)
        self.warming = False  # warm-up: the mask is 1 and the residual stream's energy is measured
        self.energy: torch.Tensor | None = None
        self.stat_hooks: list[Any] = []
        self.hooks: list[Any] = []

    def mask(self, device: torch.device) -> torch.Tensor:
        """The mask every HSM applies now: 1 during the warm-up, the frozen hard mask, else the soft mask in
        training and the hard one (top-K, or ``1[m >= 0]`` for the paper's rule) in evaluation."""
        if self.warming:
            return torch.ones(self.hidden, device=device)
        if self.keep is not None:
            return self.keep.to(device)
        if self.training and torch.is_grad_enabled():
            mask = H.soft_mask(self.centred(), self.temp, self.bias)
        elif self.rule == "topk":
            mask = H.top_k_mask(self.logits, self.target)
        else:
            mask = H.hard_mask(self.logits.detach())
        return mask.to(device)

    def centred(self) -> torch.Tensor:
        """The logits the soft mask sees: ``(m - θ) / σ`` (top-K rule: centred on the top-K threshold and scaled by
        the local spread around it, so the sharpness follows ``T`` alone) or ``m`` (the paper's rule)."""
        if self.rule == "topk":
            m = self.logits
            theta = H.top_k_threshold(m, self.target).to(m.device)
            return (m - theta) / H.top_k_spread(m, self.target).to(m.device)
        return self.logits

    def losses(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(mask loss, mean identity loss)``; the mask loss is ``None`` once the mask is frozen."""
        ident = [H.identity_loss(m.lora_A.weight) for m in self.hsms.values() if m.rank > 0]
        if self.keep is not None or self.warming:
            mask = None
        elif self.rule == "topk":
            mask = None  # the count is exact by construction and T alone sharpens the mask
        else:
            mask = H.mask_loss(self.logits, self.target)
        return mask, (torch.stack(ident).mean() if ident else None)

    def start_warmup(self, base: nn.Module) -> None:
        """Measure ``E[x_j²]`` at every hidden RMSNorm's input (the residual stream) while the mask is 1."""
        self.warming = True
        if self.energy is None:
            self.energy = torch.zeros(self.hidden, dtype=torch.float64)

        def hook(module: nn.Module, args: tuple) -> None:
            if self.warming and module.training and args:
                x = args[0].detach()
                energy = x.float().pow(2).reshape(-1, x.shape[-1]).mean(0)
                energy = (energy / energy.mean().clamp_min(1e-30)).double()
                if self.energy.device != energy.device:
                    self.energy = self.energy.to(energy.device)
                self.energy += energy

        for path in self.norm_paths:
            self.stat_hooks.append(base.get_submodule(path).register_forward_pre_hook(hook))
        if self.compensate and self.fills is None:
            if self.grams is None:
                self.grams = [None] * len(self.groups)
            for i, group in enumerate(self.groups):
                self.stat_hooks.append(base.get_submodule(group[0]).register_forward_pre_hook(self._gram_hook(i)))

    def _gram_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.warming and module.training and args and self.grams is not None:
                x = args[0].detach()
                with torch.autocast(x.device.type, enabled=False):
                    x = x.reshape(-1, x.shape[-1]).float()
                    g = x.t() @ x
                self.grams[i] = g if self.grams[i] is None else self.grams[i] + g.to(self.grams[i].device)

        return hook

    @torch.no_grad()
    def set_fills(self) -> None:
        """After the freeze: from the warm-up's Gram matrices, the least-squares map of each reader group's kept
        input dimensions onto its dropped ones (`hsm.fill_map`). From now on each reader sees its dropped
        dimensions filled in as ``u_keep M`` instead of 0, and `fold` folds ``M`` into the readers' weights."""
        assert self.keep is not None
        grams, self.grams = self.grams, None
        if not self.compensate or self.fills is not None:
            return
        if grams is None or any(g is None for g in grams):
            logger.warning("hf_prune: pat_compensate: no warm-up statistics (pat_warmup=0, or the readers never ran "
                           "in training mode during it); the readers are not compensated")
            return
        keep = self.keep.detach().float().cpu() > 0
        self.set_fill_maps([H.fill_map(g, keep).float() for g in grams if g is not None])  # grams: summed by end_warmup

    def set_fill_maps(self, fills: list[torch.Tensor]) -> None:
        """Install the reader fill maps (`set_fills`; also a checkpoint's)."""
        assert self.keep is not None
        keep = self.keep.detach().float().cpu() > 0
        device = self.logits.device
        self.fill_index = (torch.nonzero(keep).flatten().to(device), torch.nonzero(~keep).flatten().to(device))
        self.fills = [f.float().to(device) for f in fills]
        self.fill_last = None

    def filled(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Reader group ``i``'s input with its dropped dimensions filled in (the last result is reused when the
        next reader of the group gets the same tensor)."""
        assert self.fills is not None and self.fill_index is not None
        last = self.fill_last
        if last is not None and last[0] == i and last[1] is x:
            return last[2]
        if self.fills[i].device != x.device:  # a model split over devices: the map moves to its readers once
            self.fills[i] = self.fills[i].to(x.device)
        keep_idx, drop_idx = (t.to(x.device) for t in self.fill_index)
        y = H.fill_inputs(x, keep_idx, drop_idx, self.fills[i])
        self.fill_last = (i, x, y)
        return y

    @torch.no_grad()
    def end_warmup(self) -> None:
        """Start the logits from the measured energy: ``log E`` standardised (the top-K rule centres it; the
        paper's rule gets it centred on the top-K threshold and scaled to +-0.25, so K dimensions start kept)."""
        for h in self.stat_hooks:
            h.remove()
        self.stat_hooks, self.warming = [], False
        self.moments, self.adam_steps = None, 0
        if self.grams is not None and all(g is not None for g in self.grams):
            # summed over the processes here, where every rank meets, and kept on the CPU until the freeze
            grams = [g.float() for g in self.grams if g is not None]
            if world_size() > 1:
                import torch.distributed as dist

                for g in grams:
                    dist.all_reduce(g)
            self.grams = [g.cpu() for g in grams]
        if self.energy is None:
            return
        energy = self.energy.clone()
        if world_size() > 1:  # every rank takes part, then every rank decides alike
            import torch.distributed as dist

            energy = energy.to(self.logits.device)
            dist.all_reduce(energy)
        energy = energy.cpu()
        if not bool((energy > 0).all()):
            logger.warning("hf_prune: pat: the warm-up measured no energy on some hidden dimensions; the mask "
                           "logits start at 0")
            return
        z = energy.float().log().cpu()
        z = (z - z.mean()) / (z.std() + 1e-12)
        if self.rule != "topk":
            z = z - H.top_k_threshold(z, self.target)
            z = 0.5 * z / z.abs().max().clamp_min(1e-12)
        self.logits = z.to(self.logits.device).requires_grad_(True)

    def remove_hooks(self) -> None:
        """Remove every hook this object installed (the HSM sites and the warm-up statistics)."""
        for h in self.hooks + self.stat_hooks:
            h.remove()
        self.hooks, self.stat_hooks, self.warming = [], [], False

    @torch.no_grad()
    def adam_step(self, grad: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8) -> None:
        """One Adam step of the mask logits (their own optimizer: the step size is ``lr`` per step whatever the
        scale of their gradient, so every logit can reach +-0.5 within tens of steps)."""
        if self.moments is None:
            self.moments = torch.zeros(2, self.hidden, device=grad.device)
        self.adam_steps += 1
        m, v = self.moments[0], self.moments[1]
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** self.adam_steps)
        v_hat = v / (1 - betas[1] ** self.adam_steps)
        self.logits -= lr * m_hat / (v_hat.sqrt() + eps)

    def freeze(self) -> None:
        """Make the mask hard: exactly ``target`` dimensions, the largest logits."""
        self.keep = H.top_k_mask(self.logits, self.target).to(self.logits.device)
        self.logits = self.logits.detach()

    def kept(self) -> int:
        if self.keep is not None:
            return int(self.keep.sum())
        return self.target if self.rule == "topk" else int((self.logits >= 0).sum())

    def undecided(self) -> int:
        """Dimensions whose soft mask is still between 0.1 and 0.9 (before the bias)."""
        if self.keep is not None:
            return 0
        soft = torch.sigmoid(self.temp * self.centred().detach())
        return int(((soft > 0.1) & (soft < 0.9)).sum())


def _site_hook(pat: PatModules, key: str) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if pat.bypass:
            return None
        if isinstance(output, tuple):  # a projection returns a tensor; be safe with wrappers
            return (pat.hsms[key](output[0], pat.mask(output[0].device)), *output[1:])
        return pat.hsms[key](output, pat.mask(output.device))

    hook._hf_prune_pat = True  # type: ignore[attr-defined]
    return hook


def _fill_hook(pat: PatModules, i: int) -> Any:
    def hook(module: nn.Module, args: tuple) -> Any:
        if pat.bypass or pat.fills is None or not args:
            return None
        return (pat.filled(i, args[0]), *args[1:])

    hook._hf_prune_pat = True  # type: ignore[attr-defined]
    return hook


def installed(model: nn.Module) -> PatModules | None:
    """The `PatModules` attached to ``model`` (a `peft.PeftModel` or a transformers model), if any."""
    found = getattr(base_model_of(model), ATTR, None)
    return found if isinstance(found, PatModules) else None


def prepare(model: nn.Module, config: PruningConfig) -> PatModules:
    """Attach PAT's HSMs to ``model`` (idempotent) and freeze a plain model's base weights unless
    ``pat_train_base``. `PruningCallback` calls it when the Trainer is built; call it yourself before building
    the Trainer when the callback is added later. Raises before changing anything when the model cannot be
    pruned this way (`ConfigError`, `UnsupportedModelError`).

    Example:
        >>> import hf_prune
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=4, vocab_size=100, tie_word_embeddings=True))
        >>> pat = prepare(model, hf_prune.PruningConfig(method="pat", sparsity=0.25))
        >>> pat.target, len(pat.hsms), pat.hsms["embed"].rank   # tied embeddings: a diagonal HSM
        (24, 5, 0)
    """
    existing = installed(model)
    if existing is not None:
        return existing
    if config.method != "pat":
        raise ConfigError(f"prepare() is PAT's; got method={config.method!r}")
    base = base_model_of(model)
    if any(is_dtensor(p) for p in base.parameters()):
        raise UnsupportedModelError("method='pat' does not support FSDP2-sharded models; train with DDP or on one "
                                    "process")
    wrappers = _lora_wrappers(base)
    if wrappers:
        from ..peft import slicing

        slicing.check_sliceable(wrappers)
    layout = hidden_layout_with(base, wrappers)
    target = H.kept_dims(layout.hidden, float(config.sparsity), int(config.pat_multiple))  # type: ignore[arg-type]
    if target < max(int(config.pat_multiple), 1):
        raise ConfigError(
            f"method='pat' with sparsity={config.sparsity} keeps {target} of {layout.hidden} hidden dimensions after "
            f"rounding to a multiple of pat_multiple={config.pat_multiple}: too few to keep a working model; lower "
            "sparsity or pat_multiple"
        )
    if target >= layout.hidden:
        raise ConfigError(
            f"method='pat' with sparsity={config.sparsity} removes no hidden dimension of {layout.hidden} after "
            f"rounding to a multiple of pat_multiple={config.pat_multiple}; raise sparsity or lower pat_multiple"
        )
    device = base.get_submodule(layout.embed).weight.device
    devices = {path: next(base.get_submodule(path).parameters()).device for path in layout.outputs}
    if not wrappers and not config.pat_train_base:
        for p in base.parameters():
            p.requires_grad_(False)
    pat = PatModules(layout, int(config.pat_rank), target, bool(config.pat_untie), device, str(config.pat_mask_rule),
                     devices, bool(config.pat_compensate))
    base.add_module(ATTR, pat)
    for key, path in pat.paths.items():
        pat.hooks.append(base.get_submodule(path).register_forward_hook(_site_hook(pat, key)))
    for i, group in enumerate(pat.groups):
        for path in group:
            pat.hooks.append(base.get_submodule(path).register_forward_pre_hook(_fill_hook(pat, i)))
    pat.hooks.append(base.register_forward_hook(lambda *_: setattr(pat, "fill_last", None)))  # no activation kept
    return pat


def remove(model: nn.Module) -> None:
    """Detach PAT's HSMs and hooks from ``model`` without folding them (the model is as before `prepare`, except
    that frozen base weights stay frozen)."""
    base = base_model_of(model)
    pat = installed(base)
    if pat is None:
        return
    pat.remove_hooks()
    delattr(base, ATTR)


@torch.no_grad()
def fold(model: nn.Module, untie: bool = False) -> dict[str, Any]:
    """Fold the HSMs of ``model`` (its mask frozen hard: `PatModules.freeze`) into the neighbouring weights and cut
    the dropped hidden dimensions from every weight (`hf_prune.structure.hidden.cut_hidden_`); the HSMs and hooks
    are removed. The model then computes what it computed with its HSMs in evaluation mode. Returns what
    `cut_hidden_` returns, plus ``kept_dims`` (the kept indices)."""
    base = base_model_of(model)
    pat = installed(base)
    if pat is None:
        raise ConfigError("fold(): this model has no PAT modules (hf_prune.training.pat.prepare)")
    if pat.keep is None:
        raise ConfigError("fold(): the PAT mask is not hard yet; call freeze() on hf_prune.training.pat.installed("
                          "model) first")
    wrappers = _lora_wrappers(base)
    mask = pat.keep.detach().float().cpu()
    keep = torch.nonzero(mask > 0).flatten()
    transforms = {path: pat.hsms[key].transform(mask).cpu() for key, path in pat.paths.items() if key != "embed"}
    check_cut_hidden(base, keep, transforms, wrappers)  # everything the cut checks, before any weight changes
    if pat.fills is not None:  # the readers' fill maps: w[:, keep] += w[:, drop] Mᵀ, LoRA A likewise
        drop = torch.nonzero(mask <= 0).flatten()
        new: list[tuple[nn.Parameter, torch.Tensor]] = []  # all computed first, then assigned in one pass
        with torch.no_grad():
            for m, group in zip(pat.fills, pat.groups, strict=True):
                for path in group:
                    module = base.get_submodule(path)
                    layers = [module.get_base_layer()] if path in wrappers else [module]
                    if path in wrappers:
                        layers += list(wrappers[path].lora_A.values())
                    for layer in layers:
                        w = layer.weight
                        new.append((w, H.fold_fill(w.data, keep.to(w.device), drop.to(w.device), m.to(w.device))))
            for w, value in new:
                w.data = value
        pat.fills = None
    embed = pat.hsms["embed"]
    embed_map = (embed.scale.detach().float().cpu() * mask if embed.rank == 0
                 else embed.transform(mask).cpu())
    info = cut_hidden_(base, keep, transforms, embed_map, wrappers, untie=untie)  # validates before it cuts
    pat.remove_hooks()
    delattr(base, ATTR)
    return {**info, "kept_dims": keep.tolist()}


@register_method("pat", options=PatOptions)
class PruningAwareTuning(TrainingOnlyMethod):
    """PAT: a shared hidden-dimension mask learned with HSMs during fine-tuning, folded and cut at the end."""

    weight_masks: ClassVar[bool] = False

    def __init__(self, config: PruningConfig, masks: MaskState | None = None, end_step: int | None = None) -> None:
        super().__init__(config, masks, end_step)
        self.model: nn.Module | None = None
        self.pat: PatModules | None = None
        self.loss_hook: Any = None
        self.step = 0
        self.loss_scale = 1.0  # 1 / gradient accumulation steps where the Trainer does not divide the loss
        self.world = 1
        self.optimizer: Any = None
        self.last: dict[str, torch.Tensor] = {}
        self.wrappers: list[Any] = []  # LoRA layers the distillation teacher switches off
        assert self.end_step is not None
        self.freeze_step = max(1, int(math.ceil(float(config.pat_freeze) * self.end_step)))
        self.warmup_step = min(int(math.ceil(float(config.pat_warmup) * self.end_step)), self.freeze_step - 1)

    @classmethod
    def on_trainer_init(cls, model: nn.Module, config: PruningConfig) -> None:
        prepare(model, config)

    def check(self, max_steps: int) -> None:  # no schedule options: T, bias and the freeze follow max_steps
        if self.end_step is not None and self.end_step < 2:
            raise ConfigError(f"method='pat' needs at least 2 training steps (end_step / max_steps), got "
                              f"{self.end_step}")

    def set_trainer(self, args: Any, optimizer: Any) -> None:
        if float(getattr(args, "label_smoothing_factor", 0.0) or 0.0) > 0:
            raise ConfigError(
                "method='pat' adds its losses to the model's outputs.loss, and with label_smoothing_factor > 0 the "
                "Trainer computes the loss itself (outputs.loss is None), so they would be dropped; set "
                "label_smoothing_factor=0"
            )
        self.loss_scale = 1.0 / max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
        self.world = world_size() if getattr(args, "average_tokens_across_devices", False) else 1
        self.optimizer = optimizer

    def attach(self, model: nn.Module) -> None:
        pat = installed(model)
        if pat is None:
            raise ConfigError(
                "method='pat' adds trainable modules, which must exist before the Trainer builds its optimizer: "
                "pass the callback when building the Trainer (Trainer(..., callbacks=[PruningCallback(...)])), or "
                "call hf_prune.training.pat.prepare(model, config) before Trainer(...)"
            )
        groups = getattr(self.optimizer, "param_groups", None)
        if groups is not None:
            in_optimizer = {id(p) for g in groups for p in g["params"]}
            missing = [n for n, p in pat.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
            if missing:
                raise ConfigError(
                    f"method='pat': the Trainer's optimizer does not train the HSMs (e.g. {missing[0]}): it was built "
                    "before they existed (Trainer(optimizers=...) or a callback added after the Trainer was built). "
                    "Pass the callback to Trainer(callbacks=[...]) and let the Trainer build its optimizer, or call "
                    "hf_prune.training.pat.prepare(model, config) before building the optimizer"
                )
        self.model, self.pat = base_model_of(model), pat
        self.wrappers = list(_lora_wrappers(self.model).values()) if self.config.pat_distill else []
        if self.config.pat_distill:
            drifting = [n for n, p in self.model.named_parameters()
                        if p.requires_grad and "lora_" not in n and not n.startswith(ATTR + ".")]
            if drifting:
                raise ConfigError(
                    f"pat_distill > 0 distils from the model PAT started from, so only LoRA adapters and PAT's own "
                    f"modules may train, but {drifting[0]} (and {len(drifting) - 1} more) is trainable "
                    "(modules_to_save, bias='all', or unfrozen base weights); freeze them or set pat_distill=0"
                )
        self.loss_hook = self.model.register_forward_hook(self._add_losses, with_kwargs=True)

    def detach(self) -> None:
        if self.pat is not None:
            for h in self.pat.stat_hooks:
                h.remove()
            self.pat.stat_hooks = []
        if self.loss_hook is not None:
            self.loss_hook.remove()
            self.loss_hook = None

    def _add_losses(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pat = self.pat
        loss = getattr(output, "loss", None)
        if pat is None or loss is None or not module.training or not torch.is_grad_enabled():
            return None
        mask, ident = pat.losses()
        cfg = self.config
        extra = loss.new_zeros(())
        if mask is not None and cfg.pat_mask_weight:
            extra = extra + float(cfg.pat_mask_weight) * mask.to(loss.device)
            self.last[LOG_MASK_LOSS] = mask.detach()
        if ident is not None and cfg.pat_identity_weight:
            extra = extra + float(cfg.pat_identity_weight) * ident.to(loss.device)
            self.last[LOG_IDENTITY] = ident.detach()
        if cfg.pat_distill:
            kd = self._distill(module, args, kwargs, output)
            extra = extra + float(cfg.pat_distill) * kd.to(loss.device)
            self.last[LOG_DISTILL] = kd.detach()
        if kwargs.get("num_items_in_batch") is not None:
            # the model normalised its loss over the whole accumulated batch, so the Trainer does not divide it by
            # the accumulation steps (and multiplies it by the processes when tokens are averaged across them)
            extra = extra * (self.loss_scale / self.world)
        output.loss = loss + extra
        return output

    def _distill(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
        """``KL(teacher || student)`` per token, the teacher being this model with every HSM bypassed and its LoRA
        adapters off (the model PAT started from: its base weights are frozen), run in eval mode without
        gradients on the same inputs. Tokens whose next-token label is ignored (-100) do not count."""
        pat = self.pat
        assert pat is not None
        student = getattr(output, "logits", None)
        if not isinstance(student, torch.Tensor):
            raise ConfigError("pat_distill > 0 needs the model's logits in its outputs; this model returned none "
                              "(set pat_distill=0)")
        inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch")}
        inputs["use_cache"] = False
        wrappers = [w for w in self.wrappers if not getattr(w, "disable_adapters", False)]
        grads = [(p, p.requires_grad) for w in wrappers for p in w.parameters()]
        modes = [(m, m.training) for m in module.modules()]  # restored exactly: some may be in eval on purpose
        pat.bypass = True
        try:
            module.eval()
            for w in wrappers:
                w.enable_adapters(False)
            with torch.no_grad():
                teacher = module(*args, **inputs).logits
        finally:
            pat.bypass = False
            for m, mode in modes:
                m.training = mode
            for w in wrappers:
                w.enable_adapters(True)
            for p, flag in grads:  # enable_adapters(True) marks the active adapters trainable: restore as it was
                p.requires_grad_(flag)
        labels = kwargs.get("labels")
        valid = None
        if isinstance(labels, torch.Tensor) and labels.shape == student.shape[:-1]:
            valid = torch.zeros_like(labels, dtype=torch.bool)
            valid[..., :-1] = labels[..., 1:] != -100
        elif isinstance(kwargs.get("attention_mask"), torch.Tensor) and kwargs["attention_mask"].dim() == 2:
            valid = kwargs["attention_mask"].bool()
        return H.distill_loss(student, teacher, valid)

    def begin(self, model: Any, calibration: Any = None, tokenizer: Any = None) -> bool:
        self._schedule(0)
        assert self.pat is not None and self.model is not None
        if self.warmup_step > 0:
            self.pat.start_warmup(self.model)
        return False

    def _schedule(self, step: int) -> None:
        assert self.pat is not None and self.end_step is not None
        self.step = step
        self.pat.temp = H.temperature(step, self.end_step)
        self.pat.bias = H.mask_bias(step, self.end_step)

    def before_optimizer_step(self) -> None:
        pat = self.pat
        if pat is None or pat.keep is not None:
            return
        grad = pat.logits.grad
        if grad is None:
            return
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(grad)
            grad /= world_size()
        if bool(torch.isfinite(grad).all()):  # fp16 overflow steps (skipped by the GradScaler) are skipped here too
            pat.adam_step(grad, float(self.config.pat_mask_lr))
        pat.logits.grad = None

    def update(self, step: int, optimizer: Any) -> bool:
        assert self.pat is not None
        self._schedule(step)
        if self.pat.warming and step >= self.warmup_step:
            self.pat.end_warmup()
        if self.pat.keep is None and step >= self.freeze_step:
            self.pat.freeze()
            self.pat.set_fills()
            self.last.pop(LOG_MASK_LOSS, None)
            self.target = float(self.config.sparsity)  # type: ignore[arg-type]
            return True
        return False

    def achieved(self) -> float:
        if self.pat is None:
            return 0.0
        return 1.0 - self.pat.kept() / self.pat.hidden

    def log_values(self) -> dict[str, float]:
        if self.pat is None:
            return {}
        return {LOG_KEPT: float(self.pat.kept()), LOG_TEMPERATURE: round(self.pat.temp, 4),
                LOG_UNDECIDED: float(self.pat.undecided()),
                **{k: round(float(v), 6) for k, v in self.last.items()}}

    # ------------------------------------------------------------------ the end: fold and cut
    def end(self, model: nn.Module) -> StructuredReport:
        pat, base = self.pat, self.model
        assert pat is not None and base is not None
        if pat.warming:
            pat.end_warmup()
        if pat.keep is None:
            warnings.warn(f"pat: training ended at step {self.step}, before the mask was frozen (step "
                          f"{self.freeze_step}); it is made hard now, without training after it. Train for more "
                          "steps or lower pat_freeze", stacklevel=2)
            pat.freeze()
            pat.set_fills()
        self.detach()
        start = time.perf_counter()
        blocks_before = self._block_params(base)
        params_before = num_params(base) - num_params(pat)
        info = fold(base, untie=bool(self.config.pat_untie))
        blocks_after = self._block_params(base)
        cfg = self.config
        rows = [BlockRow(block=i, params_before=b, params_after=a)
                for i, (b, a) in enumerate(zip(blocks_before, blocks_after, strict=True))]
        self.target = float(cfg.sparsity)  # type: ignore[arg-type]
        return StructuredReport(
            method=cfg.method, structure="hidden", target_fraction=1.0 - pat.target / pat.hidden, blocks=rows,
            params_before=params_before, params_after=num_params(base), decoder_params_before=sum(blocks_before),
            seconds=time.perf_counter() - start, peak_rss_mb=lifetime_peak_rss_mb(),
            device=str(next(base.parameters()).device), kind="structured", reload_path="stock",
            config={**cfg.to_dict(), "plan_info": {**info, "freeze_step": self.freeze_step}},
        )

    @staticmethod
    def _block_params(base: nn.Module) -> list[int]:
        return [num_params(b) for b in find_blocks(base)[1]]

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        pat = self.pat
        return {**super().state(), "pat_step": self.step, "pat_frozen": pat is not None and pat.keep is not None,
                "pat_adam_steps": 0 if pat is None else pat.adam_steps, "pat_warming": pat is not None and pat.warming}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        pat = self.pat
        if pat is None:
            return {}
        out = {"pat/logits": pat.logits.detach().cpu()}
        if pat.moments is not None:
            out["pat/moments"] = pat.moments.cpu()
        if pat.energy is not None:
            out["pat/energy"] = pat.energy.cpu()
        if pat.keep is not None:
            out["pat/keep"] = pat.keep.detach().cpu()
        if pat.grams is not None and all(g is not None for g in pat.grams):
            out["pat/grams"] = torch.stack([g.cpu() for g in pat.grams if g is not None])
        if pat.fills is not None:
            out["pat/fills"] = torch.stack([f.cpu() for f in pat.fills])
        out.update({f"pat/hsm/{k}": v.detach().cpu() for k, v in pat.hsms.state_dict().items()})
        return out

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(meta, tensors)
        pat = self.pat
        assert pat is not None
        if "pat/logits" not in tensors:
            from .checkpoint import MissingPruningStateError

            raise MissingPruningStateError("resuming method='pat': the checkpoint holds no PAT state (mask logits "
                                           "and HSM weights); resume from a checkpoint written with the callback")
        device = pat.logits.device
        pat.logits = tensors["pat/logits"].to(device).float().requires_grad_(True)
        pat.keep = tensors["pat/keep"].to(device).float() if "pat/keep" in tensors else None
        if pat.keep is not None:
            pat.logits = pat.logits.detach()
        pat.moments = tensors["pat/moments"].to(device).float() if "pat/moments" in tensors else None
        pat.adam_steps = int(meta.get("pat_adam_steps", 0))
        pat.energy = tensors["pat/energy"].double() if "pat/energy" in tensors else None
        if "pat/grams" in tensors:
            pat.grams = list(tensors["pat/grams"].float())  # CPU: summed over processes (end_warmup) or this rank's
        if "pat/fills" in tensors and pat.keep is not None:
            if pat.compensate:
                pat.set_fill_maps(list(tensors["pat/fills"]))
            else:
                logger.warning("hf_prune: pat: the checkpoint's readers were compensated, but pat_compensate=False: "
                               "resuming without the compensation (the model changes at this step)")
        if meta.get("pat_warming") and self.model is not None:
            pat.start_warmup(self.model)
        hsm_state = {k[len("pat/hsm/"):]: v for k, v in tensors.items() if k.startswith("pat/hsm/")}
        with torch.no_grad():
            for k, v in pat.hsms.state_dict().items():
                v.copy_(hsm_state[k].to(v.device, v.dtype))
        self._schedule(int(meta.get("pat_step", 0)))
