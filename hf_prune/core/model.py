"""Architecture discovery: find the repeated decoder blocks and the prunable weights inside them.

Found generically, not from a table of model names:

* the decoder blocks are the `nn.ModuleList` whose children share one class and that holds the most
  parameters;
* prunable weights are `nn.Linear`, GPT-2's `Conv1D` (weight stored transposed, ``[in, out]``), and
  transformers v5 fused MoE expert tensors (``experts.gate_up_proj`` ``[E, 2I, H]`` and
  ``experts.down_proj`` ``[E, H, I]``), each expert a separate ``[out, in]`` matrix.

Every `PrunableLayer` exposes its weight as an ``[out_features, in_features]`` matrix, also when the
parameter is offloaded by accelerate (``device_map`` with CPU/disk offload): reads come from the offload
map, writes go back into it.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_prune.core.model import find_blocks
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> name, blocks = find_blocks(model)
    >>> name, len(blocks)
    ('model.layers', 2)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError

try:  # transformers' GPT-2 style linear with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer whose weight is stored ``[in, out]``)."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def input_device(model: nn.Module) -> torch.device:
    """Where the model expects its input ids: the input embedding's device (CPU if it is offloaded)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return torch.device("cpu")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, module_list)`` of the repeated decoder blocks."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params == 0:
            continue
        if best is None or n_params > best[0]:
            best = (n_params, name, module)
    if best is None:
        raise UnsupportedModelError(
            f"could not find the decoder blocks of {type(model).__name__}: hf_prune looks for an nn.ModuleList of "
            "identical blocks (e.g. model.layers, transformer.h) and found none. One-shot pruning needs a "
            "model built from repeated blocks; please open an issue with the model class name."
        )
    return best[1], best[2]


@dataclass
class PrunableLayer:
    """One prunable ``[out, in]`` weight matrix inside a block.

    ``expert`` is the expert index for fused MoE tensors (``module`` is then the experts module and
    ``param_name`` the 3-D parameter), else ``None``.
    """

    name: str
    module: nn.Module
    param_name: str = "weight"
    kind: str = "linear"  # "linear" | "conv1d" | "expert"
    expert: int | None = None
    stats_key: str = ""

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, int]:
        p = self.param
        if self.kind == "conv1d":
            return (p.shape[1], p.shape[0])
        if self.kind == "expert":
            return (p.shape[1], p.shape[2])
        return (p.shape[0], p.shape[1])

    @property
    def report_name(self) -> str:
        """Name used in reports: experts of one tensor are summed into one row."""
        return self.name.split("[")[0]

    def read_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view where possible; offloaded weights are read from their store)."""
        tensor = read_param(self.module, self.param_name)
        if self.kind == "conv1d":
            return tensor.t()
        if self.kind == "expert":
            return tensor[self.expert]
        return tensor

    def write_weight(self, value: torch.Tensor) -> None:
        """Write an ``[out, in]`` matrix back (in place, keeping dtype and device)."""
        if self.kind == "conv1d":
            value = value.t()
        write_param(self.module, self.param_name, value, self.expert)


def _offload_store(module: nn.Module) -> tuple[object, str] | None:
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None) if hook is not None and getattr(hook, "offload", False) else None
    if weights_map is None:
        return None
    prefix = getattr(weights_map, "prefix", "")
    dataset = getattr(weights_map, "dataset", weights_map)
    return dataset, prefix


def read_param(module: nn.Module, name: str) -> torch.Tensor:
    param = getattr(module, name)
    if param.device.type != "meta":
        return param.data
    store = _offload_store(module)
    if store is None:
        raise UnsupportedModelError(f"parameter {name} of {type(module).__name__} is on the meta device with no offload map")
    dataset, prefix = store
    return dataset[prefix + name]


def write_param(module: nn.Module, name: str, value: torch.Tensor, index: int | None) -> None:
    param = getattr(module, name)
    if param.device.type != "meta":
        target = param.data if index is None else param.data[index]
        target.copy_(value.to(dtype=target.dtype, device=target.device))
        return
    store = _offload_store(module)
    if store is None:  # pragma: no cover - guarded by _read_param
        raise UnsupportedModelError(f"cannot write offloaded parameter {name}")
    dataset, prefix = store
    key = prefix + name
    in_memory = getattr(dataset, "state_dict", dataset)
    if isinstance(in_memory, dict) and key in in_memory:
        target = in_memory[key] if index is None else in_memory[key][index]
        target.copy_(value.to(dtype=target.dtype, device=target.device))
        return
    # Disk offload (accelerate OffloadedWeightsLoader): rewrite the memory-mapped file.
    from accelerate.utils import offload_weight

    full = dataset[key].clone()
    if index is None:
        full.copy_(value.to(full.dtype))
    else:
        full[index].copy_(value.to(full.dtype))
    offload_weight(full, key, dataset.save_folder, index=dataset.index)


def _expert_layout(module: nn.Module) -> tuple[str, str] | None:
    """(gate_up name, down name) for a v5 fused-experts module in [E, out, in] layout, else None."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return None
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return None
    experts, two_inter, hidden = gate_up.shape
    if down.shape != (experts, hidden, two_inter // 2):
        return None  # e.g. transposed [E, H, 2I] layouts: not handled, reported by iter_prunable
    return "gate_up_proj", "down_proj"


def is_adapter_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a peft tuner layer wrapping a base layer (duck-typed: peft is optional)."""
    return hasattr(module, "adapter_layer_names") and callable(getattr(module, "get_base_layer", None))


def _matches(patterns: list[str] | None, name: str) -> bool:
    return any(re.search(p, name) for p in patterns or [])


def iter_prunable(
    block: nn.Module, prefix: str, targets: list[str] | None, ignore: list[str], skipped: list[str] | None = None
) -> Iterator[PrunableLayer]:
    """Yield the prunable layers of one block (full names ``prefix.sub.name``).

    Adapter wrappers (peft's tuner layers: a ``base_layer`` plus ``adapter_layer_names``, e.g. LoRA's) yield their
    base layer under the wrapper's name, and their adapter weights (``lora_A``, ``lora_B``, ...) are never yielded:
    pruning a `peft.PeftModel` prunes and masks the frozen base weights only.
    """
    inside_adapter: tuple[str, ...] = ()
    for sub_name, module in block.named_modules():
        full = f"{prefix}.{sub_name}" if sub_name else prefix
        if inside_adapter and sub_name.startswith(inside_adapter):
            continue
        if is_adapter_wrapper(module):
            inside_adapter += (f"{sub_name}.",)
            base = module.get_base_layer()
            if not ((isinstance(base, nn.Linear) or is_conv1d(base)) and not isinstance(base, nn.Embedding)):
                if skipped is not None and any(p.dim() >= 2 for p in base.parameters(recurse=False)):
                    skipped.append(f"{full} (its weights are wrapped by an adapter on parameters, e.g. LoRA "
                                   "target_parameters on fused experts: prune before adding the adapter)")
                continue
            if _matches(ignore, full) or (targets is not None and not _matches(targets, full)):
                continue
            yield PrunableLayer(name=full, module=base, kind="conv1d" if is_conv1d(base) else "linear")
            continue
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, nn.Embedding):
            if _matches(ignore, full) or (targets is not None and not _matches(targets, full)):
                continue
            kind = "conv1d" if is_conv1d(module) else "linear"
            yield PrunableLayer(name=full, module=module, kind=kind)
            continue
        three_d = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        if not three_d:
            continue
        layout = _expert_layout(module)
        if layout is None:
            if skipped is not None:
                skipped.append(f"{full} ({', '.join(three_d)}: unknown fused-expert layout)")
            continue
        n_experts = getattr(module, layout[0]).shape[0]
        for pname in layout:
            pfull = f"{full}.{pname}"
            if _matches(ignore, pfull) or (targets is not None and not _matches(targets, pfull)):
                continue
            for e in range(n_experts):
                yield PrunableLayer(name=f"{pfull}[{e}]", module=module, param_name=pname, kind="expert", expert=e)


def count_prunable(model: nn.Module, targets: list[str] | None, ignore: list[str]) -> int:
    """Number of prunable matrices in the model (0 means the config selects nothing)."""
    prefix, blocks = find_blocks(model)
    return sum(1 for i, b in enumerate(blocks) for _ in iter_prunable(b, f"{prefix}.{i}", targets, ignore))
