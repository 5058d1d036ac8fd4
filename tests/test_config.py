"""The presets match the published gpt-oss configs, and a config survives the HF config.json round trip."""
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
