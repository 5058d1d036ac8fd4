"""The presets match the published gpt-oss configs, and a config survives the HF config.json round trip."""
import dataclasses

import pytest

from gptoss.config import GPT_OSS_20B, GPT_OSS_120B, TINY, ModelConfig


@pytest.mark.parametrize("cfg,layers,experts", [(GPT_OSS_20B, 24, 32), (GPT_OSS_120B, 36, 128)])
def test_presets_match_the_published_configs(cfg, layers, experts):
    assert (cfg.num_layers, cfg.num_experts, cfg.experts_per_token) == (layers, experts, 4)
    assert (cfg.hidden_size, cfg.intermediate_size) == (2880, 2880)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 8, 64)
    assert cfg.vocab_size == 201088 and cfg.max_context == 131072
    assert cfg.sliding_window == 128
    assert cfg.layer_types == tuple(("sliding_attention", "full_attention")[i % 2] for i in range(layers))
    assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_initial_context) == (150000.0, 32.0, 4096)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow) == (32.0, 1.0)
    assert (cfg.swiglu_limit, cfg.rms_norm_eps) == (7.0, 1e-5)


@pytest.mark.parametrize("cfg", [GPT_OSS_20B, TINY])
def test_hf_dict_round_trip(cfg):
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    d = TINY.to_hf_dict()
    assert "pad_token_id" not in d and "eos_token_id" not in d  # ids past a tiny vocabulary
    assert GPT_OSS_20B.to_hf_dict()["eos_token_id"] == 200002


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": "64"}, "hidden_size must be an integer in 1..2147483647 (got '64')"),
    ({"num_layers": True}, "num_layers must be an integer in 1..2147483647 (got True)"),
    ({"vocab_size": 2**31}, "vocab_size must be an integer in 1..2147483647 (got 2147483648)"),
    ({"max_context": 0}, "max_context must be an integer in 1..2147483647 (got 0)"),
    ({"rope_theta": "x"}, "rope_theta must be a finite number (got 'x')"),
    ({"swiglu_limit": float("nan")}, "swiglu_limit must be a finite number (got nan)"),
    ({"num_layers": 10**6}, "num_layers 1000000 is more than 4096"),
    ({"rope_theta": 1.0}, "rope_theta must be above 1 (got 1.0)"),
    ({"rope_scaling_factor": -1.0}, "rope_scaling_factor must be positive (got -1.0)"),
    ({"rope_beta_fast": 1.0}, "rope_beta_fast (1.0) must exceed rope_beta_slow (1.0), which must be positive"),
    ({"swiglu_limit": 0.0}, "swiglu_limit and swiglu_alpha must be positive (got 0.0, 1.702)"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps must not be negative (got -1e-05)"),
    ({"num_heads": 5}, "num_heads 5 is not a multiple of num_kv_heads 2"),
    ({"experts_per_token": 5}, "experts_per_token 5 > num_experts 4"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries for 2 layers"),
    ({"layer_types": [1, 2]}, "layer_types must be a list of names (got (1, 2))"),
    ({"layer_types": 7}, "layer_types must be a list of names (got 7)"),
])
def test_every_field_is_checked_before_use(change, message):
    """A config is typed and in range before anything sizes a table from it (num_layers sizes the default
    layer_types) or takes a logarithm of it (YaRN)."""
    with pytest.raises(ValueError) as e:
        ModelConfig(**dict(TINY.to_dict(), **change))
    assert str(e.value) == f"invalid model config: {message}"


def test_float_fields_are_floats():
    cfg = ModelConfig(**dict(TINY.to_dict(), rope_theta=10000, swiglu_limit=7))
    assert type(cfg.rope_theta) is float and type(cfg.swiglu_limit) is float and cfg == dataclasses.replace(
        TINY, rope_theta=10000.0, swiglu_limit=7.0)


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": "64"}, "hidden_size must be an integer (got '64')"),
    ({"num_local_experts": 4.0}, "num_local_experts must be an integer (got 4.0)"),
    ({"rope_theta": float("inf"), "rope_parameters": None}, "invalid model config: rope_theta must be a finite number "
                                                            "(got inf)"),
    ({"rope_theta": 10**400, "rope_parameters": None}, "rope_theta 1000000000000000000000000000000000000... is too "
                                                       "large"),
    ({"swiglu_limit": [7]}, "swiglu_limit must be a number (got [7])"),
    ({"rope_scaling": "yarn", "rope_parameters": None}, "rope_scaling must be an object (got 'yarn')"),
    ({"layer_types": "full_attention"}, "layer_types must be a list (got 'full_attention')"),
    ({"num_hidden_layers": 10**9, "layer_types": None}, "invalid model config: num_layers 1000000000 is more than 4096"),
])
def test_hf_dict_values_of_the_wrong_kind(change, message):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict(dict(TINY.to_hf_dict(), **change))
    assert str(e.value) == message
