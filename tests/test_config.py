"""Config validation: weight resolution per method and clear messages for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trimix.config import load_config, parse_weights_arg
from trimix.errors import ConfigError


def _cfg(**fusion) -> dict:
    return {
        "models": [
            {"model": "a", "role": "large", "weight": fusion.pop("a", None)},
            {"model": "b", "role": "small_cpt", "weight": fusion.pop("b", None)},
            {"model": "c", "role": "small_base"},
        ],
        "fusion": fusion,
    }


def test_trimix_derives_small_base_weight() -> None:
    config = load_config(_cfg(method="trimix", a=0.1, b=0.9))
    assert config.weights() == pytest.approx({"large": 0.1, "small_cpt": 0.9, "small_base": 0.0})
    config = load_config(_cfg(method="trimix", a=0.5, b=1.0))
    assert config.weights()["small_base"] == pytest.approx(-0.5)


def test_proxy_tuning_and_single_weights() -> None:
    assert load_config(_cfg(method="proxy_tuning")).weights() == {
        "large": 1.0,
        "small_cpt": 1.0,
        "small_base": -1.0,
    }
    assert load_config(_cfg(method="proxy_tuning", alpha=0.5)).weights()["small_base"] == -0.5
    assert load_config(_cfg(method="single", role="small_cpt")).weights() == {
        "large": 0.0,
        "small_cpt": 1.0,
        "small_base": 0.0,
    }


def test_resolved_config_validates_again() -> None:
    config = load_config(_cfg(method="trimix", a=0.3, b=0.9))
    again = load_config(config.model_dump())
    assert again.weights() == config.weights()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_cfg(method="trimix", a=float("nan"), b=0.9), "finite"),
        (_cfg(method="trimix", a=0.1), "needs `weight` on the large"),
        (_cfg(method="single", role="nope"), "fusion.role"),
        (_cfg(method="proxy_tuning", a=0.3), "sets it to 1"),
        (
            _cfg(method="trimix", a=0.1, b=0.9, plausibility={"role": "none"}),
            "plausibility.role` must be one of",
        ),
        (_cfg(method="weighted", a=1.0), "needs a `weight` on every source"),
        (_cfg(method="trimix", a=0.1, b=0.9, vocab="nope"), "fusion.vocab"),
        ({**_cfg(method="trimix", a=0.1, b=0.9), "modles": []}, "modles"),
        ({"models": [{"model": "a", "role": "x"}, {"model": "b", "role": "x"}]}, "unique `role`"),
    ],
)
def test_bad_configs_fail_clearly(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_weights_from_selection_file(tmp_path) -> None:
    selection = tmp_path / "selection.json"
    selection.write_text(
        json.dumps({"selected": {"weights": {"large": 0.3, "small_cpt": 0.7, "small_base": 0.0}}})
    )
    raw = _cfg(method="trimix")
    raw["fusion"]["weights_from"] = str(selection)
    config = load_config(raw)
    # 0.3 / 0.7 / 0.0 is a TriMix point (small_base = 1 - a - b), so the method keeps its meaning.
    assert config.fusion.method == "trimix"
    assert config.weights() == {"large": 0.3, "small_cpt": 0.7, "small_base": pytest.approx(0.0)}
    assert config.fusion.weights_from is None  # applied at load; the resolved config records the weights


def test_partial_weights_keep_the_method_or_are_refused() -> None:
    trimix = load_config(_cfg(method="trimix"), weights={"large": 0.3, "small_cpt": 0.9})
    assert trimix.fusion.method == "trimix"
    assert trimix.weights() == {"large": 0.3, "small_cpt": 0.9, "small_base": pytest.approx(-0.2)}
    explicit = load_config(_cfg(method="trimix"), weights={"large": 0.3, "small_cpt": 0.9, "small_base": 0.0})
    assert explicit.fusion.method == "weighted" and explicit.weights()["small_base"] == 0.0
    with pytest.raises(ConfigError) as info:
        load_config(_cfg(method="proxy_tuning"), weights={"large": 0.3, "small_cpt": 0.9})
    message = str(info.value)
    assert "ambiguous" in message
    assert (
        "read as TriMix (small_base derived), it fuses large=0.3, small_cpt=0.9, small_base=-0.2" in message
    )
    assert (
        "read as 'weighted' with the unnamed sources at 0, it fuses large=0.3, small_cpt=0.9, small_base=0"
        in message
    )
    with pytest.raises(ConfigError, match="names role"):
        load_config(_cfg(method="trimix"), weights={"huge": 1.0})


def test_parse_weights_arg() -> None:
    assert parse_weights_arg("large=0.1, small_cpt=0.9") == {"large": 0.1, "small_cpt": 0.9}
    with pytest.raises(ConfigError, match="role=number"):
        parse_weights_arg("large:0.1")


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")), ids=str
)
def test_shipped_configs_validate(path: Path) -> None:
    config = load_config(path)
    fusion = config.resolved_fusion()
    # Every source's weight is resolved and the run fuses at least one source.
    assert set(fusion.weights) == {m.role for m in config.models} and fusion.roles
