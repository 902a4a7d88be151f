import pytest

from chat_app.config import ConfigError, load_config


def test_yaml_and_overrides_build_one_typed_object():
    config = load_config("configs/tiny.yaml", ["ppo.kl_coef=0.1", "serve.port=9999", "lora.target_modules=[q_proj]"])
    assert config.model.name == "tiny-random"
    assert config.ppo.kl_coef == 0.1 and config.serve.port == 9999
    assert config.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize("override, message", [("ppo.nope=1", "unknown config key: ppo.nope"),
                                               ("serve.port=abc", "serve.port: expected int"),
                                               ("ppo", "is not key=value"),
                                               ("reward.min_skill_confidence=1",
                                                "reward.min_skill_confidence: expected"),
                                               ("reward.feature_layers=0", "reward.feature_layers: expected")])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_every_shipped_config_loads():
    for name in ("default", "gpu", "tiny"):
        load_config(f"configs/{name}.yaml")


def test_quantization_needs_bitsandbytes_and_warns_on_cpu(monkeypatch, caplog):
    import sys

    import torch

    from chat_app.model import ModelSetupError, check_quantization
    config = load_config("configs/tiny.yaml", ["model.quantization=4bit"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)          # as if it were not installed
    with pytest.raises(ModelSetupError, match="needs bitsandbytes"):
        check_quantization(config.model, torch.device("cpu"))
    monkeypatch.undo()
    pytest.importorskip("bitsandbytes")
    with caplog.at_level("WARNING"):
        check_quantization(config.model, torch.device("cpu"))      # it runs on CPU, and says it is slower there
    assert "on CPU" in caplog.text
