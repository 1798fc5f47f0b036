"""hf_prune's load and save paths for structurally pruned checkpoints.

Loading: `install()` wraps ``PreTrainedModel.__init__`` and ``post_init`` so that, whenever a config carries
``hf_prune_structure``, the outermost model is built full-width and then shrunk to the recorded per-layer shapes
before its weights are initialised or loaded -- the same functions the checkpoint's ``trust_remote_code`` file
runs (`modeling_hf_prune.begin_build` / `finish_build`). For any other config the wrappers cost one attribute
lookup.

Saving: `finalize_checkpoint` runs on the finished (temporary) checkpoint folder: for a config that needs
hf_prune it copies ``modeling_hf_prune.py`` next to config.json and adds ``auto_map`` entries, so the folder also
loads with ``trust_remote_code=True`` where hf_prune is not installed.

Example:
    >>> from hf_prune.structure.loading import auto_map_for
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> auto_map_for(model)["AutoModelForCausalLM"]
    'modeling_hf_prune.HfPruneLlamaForCausalLM'
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..io.atomic import atomic_write_bytes
from . import modeling_hf_prune as shipped
from .config_io import is_structured

MODELING_FILE = Path(shipped.__file__).name
_ORIGINAL_INIT = PreTrainedModel.__init__
_ORIGINAL_POST_INIT = PreTrainedModel.post_init


def _init(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
    shipped.begin_build(self, config)
    _ORIGINAL_INIT(self, config, *args, **kwargs)


def _post_init(self: PreTrainedModel) -> None:
    shipped.finish_build(self)
    _ORIGINAL_POST_INIT(self)


def install() -> None:
    """Make ``from_pretrained``/``from_config`` build structurally pruned checkpoints (idempotent)."""
    PreTrainedModel.__init__ = functools.wraps(_ORIGINAL_INIT)(_init)  # type: ignore[method-assign]
    PreTrainedModel.post_init = functools.wraps(_ORIGINAL_POST_INIT)(_post_init)  # type: ignore[method-assign]


def uninstall() -> None:
    """Undo `install()`."""
    PreTrainedModel.__init__ = _ORIGINAL_INIT  # type: ignore[method-assign]
    PreTrainedModel.post_init = _ORIGINAL_POST_INIT  # type: ignore[method-assign]


def _stock_name(cls: type) -> str:
    name = cls.__name__
    return name[len(shipped.PREFIX):] if name.startswith(shipped.PREFIX) else name


def auto_map_for(model: nn.Module) -> dict[str, str]:
    """``auto_map`` entries pointing the Auto classes at the saved modeling file."""
    module = MODELING_FILE.removesuffix(".py")
    out = {"AutoModelForCausalLM": f"{module}.{shipped.PREFIX}{_stock_name(type(model))}"}
    base = getattr(model, "base_model", None)
    if isinstance(base, PreTrainedModel) and base is not model:
        out["AutoModel"] = f"{module}.{shipped.PREFIX}{_stock_name(type(base))}"
    return out


def finalize_checkpoint(model: nn.Module, folder: str | Path) -> None:
    """Add the modeling file and ``auto_map`` to a freshly saved checkpoint folder when its config needs them."""
    folder = Path(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        config["architectures"] = [a.removeprefix(shipped.PREFIX) for a in config["architectures"]]
    if is_structured(model.config):
        shutil.copyfile(shipped.__file__, folder / MODELING_FILE)
        config["auto_map"] = {**config.get("auto_map", {}), **auto_map_for(model)}
    elif _points_here(config.get("auto_map")):  # a no-longer-structured model saved over its old config
        config.pop("auto_map")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def upgrade_checkpoint(folder: str | Path) -> bool:
    """Replace the ``modeling_hf_prune.py`` inside a saved per-layer checkpoint with this version's copy.

    For ``trust_remote_code`` users: the copy in an older checkpoint keeps the code of the hf_prune that saved it
    (checkpoints saved before transformers 5.24 support read the KV cache only under ``past_key_values``). With
    hf_prune installed this is not needed: ``from_pretrained`` builds the model with the package's own code and
    never runs the folder's copy. Returns True if the file changed; written through a temporary file and a rename.

    Raises:
        FileNotFoundError: ``folder`` has no ``modeling_hf_prune.py`` (not a per-layer hf_prune checkpoint).
    """
    target = Path(folder) / MODELING_FILE
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist: {folder} is not a per-layer hf_prune checkpoint "
                                "(uniform checkpoints load with stock transformers and need no upgrade)")
    new = Path(shipped.__file__).read_bytes()
    if target.read_bytes() == new:
        return False
    atomic_write_bytes(target, new)
    return True


def _points_here(auto_map: dict | None) -> bool:
    prefix = MODELING_FILE.removesuffix(".py") + "."
    return bool(auto_map) and all(str(v).startswith(prefix) for v in auto_map.values())
