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


def test_configs_saved_by_version_0_1_still_load() -> None:
    """tests/fixtures/pruning_configs_v0.1.json: config.json ``pruning_config`` entries written by hf_prune 0.1
    (one flat dict with every option of every family, plus run metadata)."""
    import json
    import warnings
    from pathlib import Path
    from types import SimpleNamespace

    saved = json.loads((Path(__file__).parent / "fixtures" / "pruning_configs_v0.1.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every foreign option holds its default: dropped silently
        loaded = {k: PruningConfig.from_model(SimpleNamespace(config=SimpleNamespace(pruning_config=v)))
                  for k, v in saved.items()}
    s = loaded["sparsegpt-2of4"]
    assert (s.method, s.nm, s.sparsity, s.options.blocksize, s.options.dampening) == ("sparsegpt", (2, 4), 0.5, 64, 0.01)
    w = loaded["wanda-owl"]
    assert (w.sparsity, w.options.owl, w.options.owl_lambda) == (0.6, True, 0.1)
    f = loaded["flap-reconstruct"]
    assert (f.structure, f.options.reconstruct, f.options.dampening, f.options.allocation) == ("width", True, 0.02,
                                                                                              "uniform")
    g = loaded["gmp"]
    assert (g.options.schedule, g.options.end_step, g.options.update_every) == ("linear", 100, 5)
    for cfg in loaded.values():  # and they round-trip in the new format
        assert PruningConfig.from_dict(cfg.to_dict()) == cfg
        assert not {"movement_l1", "finercut_tokens"} & set(cfg.to_dict()) or cfg.method == "soft_movement"
