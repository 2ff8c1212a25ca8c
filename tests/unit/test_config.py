"""The one configuration object: defaults, strictness, family defaults, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from serving.cli import main
from serving.config import ConfigError, ModelConfig, ServingConfig, default_config, load_config


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_serves_smollm2_on_port_8000() -> None:
    cfg = default_config()
    assert [m.name for m in cfg.models] == ["smollm2-135m-instruct"]
    assert cfg.models[0].source == "builtin:smollm2-135m-instruct"
    assert cfg.gateway.port == 8000
    assert not str(cfg.local.state_dir).startswith("~")


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = default_config()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_unknown_key_is_rejected_and_named(tmp_path: Path) -> None:
    data = {"models": [{"name": "m", "source": "/x"}], "gateway": {"prot": 1}}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.key == "gateway.prot"
    assert "gateway.prot" in str(err.value)


def test_nested_bad_value_names_the_key(tmp_path: Path) -> None:
    data = {"models": [{"name": "m", "source": "/x", "topology": {"tensor_parallel_size": 0}}]}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.key == "models.0.topology.tensor_parallel_size"


def test_duplicate_model_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="repeated: a"):
        ServingConfig(models=[ModelConfig(name="a", source="/x"), ModelConfig(name="a", source="/y")])


def test_unknown_builtin_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown built-in"):
        ModelConfig(name="a", source="builtin:nope")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("name", "source", "family"),
    [
        ("gpt-oss-120b", "openai/gpt-oss-120b", "gpt-oss"),
        ("tiny", "builtin:gpt-oss-tiny", "gpt-oss"),
        ("smol", "builtin:smollm2-135m-instruct", "generic"),
    ],
)
def test_gpt_oss_gets_its_parsers_by_default(name: str, source: str, family: str) -> None:
    model = ModelConfig(name=name, source=source)
    kwargs = model.effective_engine_kwargs()
    assert model.resolved_family.value == family
    if family == "gpt-oss":
        assert kwargs["tool_call_parser"] == "openai"
        assert kwargs["reasoning_parser"] == "openai_gptoss"
        assert kwargs["enable_auto_tool_choice"] is True
    else:
        assert "reasoning_parser" not in kwargs


def test_explicit_engine_kwargs_win_over_family_defaults() -> None:
    model = ModelConfig(
        name="gpt-oss-20b", source="openai/gpt-oss-20b", engine_kwargs={"tool_call_parser": "x"}
    )
    assert model.effective_engine_kwargs()["tool_call_parser"] == "x"


def test_expert_parallel_topology_sets_engine_kwargs() -> None:
    model = ModelConfig.model_validate(
        {
            "name": "gpt-oss-120b",
            "source": "openai/gpt-oss-120b",
            "topology": {
                "kind": "expert_parallel",
                "data_parallel_size": 16,
                "all2all_backend": "deepep_low_latency",
            },
        }
    )
    kwargs = model.effective_engine_kwargs()
    assert kwargs["data_parallel_size"] == 16
    assert kwargs["enable_expert_parallel"] is True
    assert kwargs["all2all_backend"] == "deepep_low_latency"


def test_data_parallel_needs_expert_parallel_kind() -> None:
    with pytest.raises(ValueError, match="expert_parallel"):
        ModelConfig.model_validate({"name": "m", "source": "/x", "topology": {"data_parallel_size": 2}})


def test_cli_config_show_prints_effective_yaml() -> None:
    result = CliRunner().invoke(main, ["config", "show"])
    assert result.exit_code == 0
    shown = yaml.safe_load(result.output)
    assert shown["models"][0]["name"] == "smollm2-135m-instruct"
    assert shown["gateway"]["port"] == 8000


def test_cli_config_show_reads_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"models": [{"name": "m1", "source": "/w"}], "gateway": {"port": 9001}})
    monkeypatch.setenv("OSS_SERVING_CONFIG", str(path))
    shown = yaml.safe_load(CliRunner().invoke(main, ["config", "show"]).output)
    assert shown["gateway"]["port"] == 9001


def test_cli_config_validate(tmp_path: Path) -> None:
    good = _write(tmp_path, {"models": [{"name": "m", "source": "/w"}]})
    ok = CliRunner().invoke(main, ["config", "validate", str(good)])
    assert ok.exit_code == 0
    assert "valid" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "/w", "engine_kwrgs": {}}]}))
    result = CliRunner().invoke(main, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    assert "models.0.engine_kwrgs" in result.output


def test_cli_config_validate_runs_the_gpu_budget_check(tmp_path: Path) -> None:
    def model(tp: int) -> dict[str, object]:
        return {
            "name": "gpt-oss-120b",
            "source": "openai/gpt-oss-120b",
            "engine_kwargs": {"max_model_len": 32768},
            "topology": {"accelerator": "gpu", "gpu_type": "A100-40GB", "tensor_parallel_size": tp},
        }

    too_small = _write(tmp_path, {"models": [model(1)]})
    result = CliRunner().invoke(main, ["config", "validate", str(too_small)])
    assert result.exit_code == 2
    assert "does not fit" in result.output
    fits = tmp_path / "fits.yaml"
    fits.write_text(yaml.safe_dump({"models": [model(4)]}))
    ok = CliRunner().invoke(main, ["config", "validate", str(fits)])
    assert ok.exit_code == 0, ok.output
    assert "KV tokens" in ok.output
