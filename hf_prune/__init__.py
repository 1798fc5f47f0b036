"""hf_prune: prune any Hugging Face transformers model and reload it with ``from_pretrained``.

Importing this package registers the built-in methods and adds ``model.prune(...)`` to every
transformers `PreTrainedModel`.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_prune
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> report = model.prune(hf_prune.PruningConfig(method="magnitude", sparsity=0.5), verbose=False,
    ...                      show_progress=False)
    >>> round(report.achieved_sparsity, 2)
    0.5
"""

# The built-in families register their methods (hf_prune.registry) when imported; the quantizer of compressed
# checkpoints registers with transformers.
from . import formats, oneshot  # noqa: E402,F401
from ._version import __version__  # noqa: E402,F401
from .api import prune, validate  # noqa: E402
from .config import PruningConfig  # noqa: E402
from .core.precision import auto_dtype  # noqa: E402
from .errors import (  # noqa: E402
    CalibrationError,
    ConfigError,
    HfPruneError,
    IncompletePruningError,
    NumericalError,
    UnsupportedModelError,
)
from .evaluate import perplexity  # noqa: E402
from .integrations import transformers as _transformers_integration  # noqa: E402
from .registry import available_methods, register_method  # noqa: E402
from .report import PruningReport  # noqa: E402
from .structure import experts as _expert_methods  # noqa: E402,F401
from .structure import methods as _structured_methods  # noqa: E402,F401
from .training import PruningCallback  # noqa: E402
from .training import loraprune as _loraprune  # noqa: E402,F401
from .training import methods as _training_methods  # noqa: E402,F401
from .training import pat as _pat  # noqa: E402,F401
from .training.recover import recover  # noqa: E402

_transformers_integration.install()


def _register_peft_method() -> None:
    """Register masked LoRA (`hf_prune.peft`) with peft when peft is installed. peft is not imported when it is
    absent, and a peft whose internals changed costs a warning, never ``import hf_prune``."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return
    try:
        importlib.import_module("hf_prune.peft")
    except Exception as exc:  # any failure inside peft must leave the rest of hf_prune usable
        import warnings
        from importlib.metadata import PackageNotFoundError, version

        try:
            peft_version = version("peft")
        except PackageNotFoundError:
            peft_version = "(unknown version)"
        warnings.warn(f"hf_prune: masked LoRA (hf_prune.peft) is unavailable with peft {peft_version}: "
                      f"{type(exc).__name__}: {exc}. Pruning is not affected; `import hf_prune.peft` shows the "
                      "full error (tested with peft 0.21).", RuntimeWarning, stacklevel=2)


_register_peft_method()

__all__ = [
    "auto_dtype",
    "CalibrationError",
    "ConfigError",
    "HfPruneError",
    "IncompletePruningError",
    "NumericalError",
    "PruningCallback",
    "PruningConfig",
    "PruningReport",
    "UnsupportedModelError",
    "available_methods",
    "perplexity",
    "recover",
    "prune",
    "register_method",
    "validate",
]
