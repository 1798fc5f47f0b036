"""Options of the structured methods (declared once; the CLI and the docs read the ``help`` metadata).

Example:
    >>> from hf_prune.structure.options import WidthOptions
    >>> WidthOptions(width_units="mlp").allocation
    'global'
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodOptions, boolean, fraction, option, positive, positive_int
from ..oneshot.options import DampeningOptions

WIDTH_UNITS = ("both", "mlp", "heads")
ALLOCATIONS = ("global", "uniform")
GQA_MODES = ("query", "group")
TAYLOR_VARIANTS = ("element", "vector")


@dataclass
class WidthUnitOptions(MethodOptions):
    """Which width units go and how they are spread over the blocks (width methods, LoRAPrune)."""

    width_units: str = option("both", "what width methods remove: 'both' (MLP channels and heads), 'mlp' or "
                              "'heads'", choices=WIDTH_UNITS)
    allocation: str = option("global", "'global': one standardized threshold across layers (FLAP; layers lose "
                             "different amounts); 'uniform': every layer loses the same fraction", choices=ALLOCATIONS)
    gqa_mode: str = option("query", "'query': the same number of query heads leaves every kv group (GQA stays "
                           "uniform); 'group': whole kv groups go", choices=GQA_MODES)
    round_to: int = option(1, "keep a multiple of this many MLP channels per layer (e.g. 8 or 32 for faster "
                           "kernels; 1 = no rounding)", check=positive_int)


@dataclass
class WidthOptions(DampeningOptions, WidthUnitOptions):
    """Width pruning (flap, wanda-sp, taylor): MLP channels and attention heads."""

    bias_compensation: bool = option(True, "FLAP bias compensation: the mean contribution of removed channels "
                                     "moves into the output projection's bias (flap, wanda-sp)", check=boolean)
    reconstruct: bool = option(False, "refit the output projections by least squares, block by block, on the "
                               "pruned model's own inputs against the dense output (about 4x the scoring pass)",
                               check=boolean)


@dataclass
class TaylorOptions(WidthOptions):
    """First-order Taylor importance over LLM-Pruner dependency groups."""

    taylor_variant: str = option("element", "'element': sum of |w*g| (LLM-Pruner's best); 'vector': |sum of w*g| "
                                 "over the group", choices=TAYLOR_VARIANTS)


@dataclass
class AngularOptions(MethodOptions):
    """Angular distance between the inputs of blocks l and l+n (Gromov et al.)."""

    angular_last_token: bool = option(True, "measure distances on each sequence's last token (the paper's "
                                      "choice) instead of all tokens", check=boolean)


@dataclass
class FinerCutOptions(MethodOptions):
    """Greedy removal of attention/MLP sublayers."""

    finercut_tokens: int = option(2048, "calibration tokens the greedy search compares with the dense model "
                                  "(it runs many forwards, so it uses fewer tokens)", check=positive_int)


EXPERT_ALLOCATIONS = ("uniform", "global")


@dataclass
class ExpertOptions(MethodOptions):
    """Routed-expert removal (expert-frequency, ean, reap, easy-ep, random); ``sparsity`` = fraction of routed
    experts removed."""

    expert_allocation: str = option("uniform", "'uniform': every MoE layer loses the same number of experts (the "
                                    "checkpoint loads with stock transformers); 'global': the lowest experts "
                                    "relative to their layer's mean score go, giving per-layer counts (loads "
                                    "through hf_prune or trust_remote_code)", choices=EXPERT_ALLOCATIONS)
    super_expert_guard: bool = option(True, "never remove super experts (largest |expert output| above the "
                                      "super_expert_quantile of all experts and above super_expert_fraction of "
                                      "the largest); they are listed in the report", check=boolean)
    super_expert_quantile: float = option(0.995, "quantile of all experts' largest |output| a super expert must "
                                          "exceed", check=fraction)
    super_expert_fraction: float = option(0.1, "fraction of the largest |expert output| in the model a super expert "
                                          "must exceed", check=fraction)
    super_expert_median_ratio: float = option(10.0, "a super expert's largest |output| must also be at least this "
                                              "many times the median expert's (an outlier, not merely the largest)",
                                              check=positive)
    expert_merge: bool = option(False, "fold each removed expert into the kept expert with the most similar "
                                "router logits (frequency-weighted average of their weights, M-SMoE/DERN style) "
                                "instead of dropping it", check=boolean)
