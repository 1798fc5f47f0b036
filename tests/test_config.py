"""PruningConfig validation and (de)serialisation."""

from __future__ import annotations

import pytest

from hf_prune import ConfigError, PruningConfig, available_methods


def test_methods_registered() -> None:
    assert {"magnitude", "wanda", "sparsegpt"} <= set(available_methods())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 must be a number in \[0, 1\)"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": "half"}, "sparsity"),
        ({"structure": "4:4"}, "0 < N < M"),
        ({"structure": "5:4"}, "0 < N < M"),
        ({"structure": "2-4"}, "'unstructured' or 'N:M'"),
        ({"structure": "2:4", "sparsity": 0.7}, "contradicts structure='2:4'"),
        ({"method": "wandaa"}, "Did you mean 'wanda'"),
        ({"method": "obc"}, "allowed"),
        ({"magnitude_group": "column"}, "magnitude_group"),
        ({"num_calibration_samples": 0}, "num_calibration_samples"),
        ({"seqlen": -5}, "seqlen"),
        ({"dampening": 0}, "dampening"),
        ({"targets": "q_proj"}, "list of regular expressions"),
        ({"ignore": ["("]}, "not a valid regular expression"),
        ({"layer_sparsity": {"q_proj": 1.5}}, r"layer_sparsity\['q_proj'\]"),
        ({"owl": True, "structure": "2:4", "sparsity": None}, "owl=True needs structure='unstructured'"),
        ({"owl": True, "sparsity": 0.95, "owl_lambda": 0.08}, "owl_lambda"),
        ({"sparsity": None}, "sparsity is required"),
    ],
)
def test_invalid_configs_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PruningConfig(**kwargs)


def test_nm_sparsity_is_implied() -> None:
    cfg = PruningConfig(method="sparsegpt", sparsity=None, structure="4:8")
    assert cfg.sparsity == 0.5 and cfg.nm == (4, 8)
    assert PruningConfig(structure="1:4", sparsity=None).sparsity == 0.75


def test_json_round_trip_and_unknown_fields() -> None:
    cfg = PruningConfig(method="sparsegpt", sparsity=0.6, layer_sparsity={r"\.0\.": 0.3}, owl=True, seed=3)
    assert PruningConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="did you mean 'sparsity'"):
        PruningConfig.from_dict({"sparsty": 0.5})


def test_layer_sparsity_override() -> None:
    cfg = PruningConfig(sparsity=0.5, layer_sparsity={r"layers\.0\.": 0.2})
    assert cfg.sparsity_for("model.layers.0.mlp.up_proj") == 0.2
    assert cfg.sparsity_for("model.layers.1.mlp.up_proj") == 0.5
