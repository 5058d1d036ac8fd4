"""The NumPy reference against Hugging Face transformers' GptOssForCausalLM, float32 on the CPU.

Each case writes a random checkpoint with gptoss.weights.write_hf_checkpoint, runs ReferenceModel on
open_weights(dir), and loads the same directory into transformers with
`from_pretrained(dir, dtype=float32, attn_implementation="eager")`. For the MXFP4 checkpoints we pass
`quantization_config=Mxfp4Config(dequantize=True)`: on a CPU without the `kernels` package transformers
(5.23) dequantizes the packed experts at load time into the parameter's dtype (float32 here), so its
forward is the plain GptOssExperts one.

Error measure: max |ours - theirs| over all logits / max |theirs| (relative to the largest logit).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptoss.config import TINY, TINY_REAL_HEADS, yarn_inv_freq_and_scale  # noqa: E402
from gptoss.reference import ReferenceModel, greedy_generate  # noqa: E402
from gptoss.weights import open_weights, write_hf_checkpoint  # noqa: E402

STEPS = 32


def max_rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def load_transformers(directory, experts: str):
    kwargs = dict(dtype=torch.float32, attn_implementation="eager",
                  # our config.json names harmony's pad/eos ids (199999, 200002), past a tiny vocabulary:
                  # nn.Embedding rejects such a padding_idx, and generate would stop at no real eos anyway
                  pad_token_id=None, eos_token_id=None)
    if experts == "mxfp4":
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(directory, **kwargs)
    return model.eval()


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
@pytest.mark.parametrize("cfg", [TINY, TINY_REAL_HEADS], ids=["tiny", "tiny-real-heads"])
def test_reference_matches_transformers(tmp_path, cfg, experts):
    directory = write_hf_checkpoint(cfg, tmp_path / "model", experts, seed=7)
    weights = open_weights(directory)
    assert weights.experts_format == experts
    ours = ReferenceModel(weights)
    theirs = load_transformers(directory, experts)
    assert theirs.config._attn_implementation == "eager"

    # The same expert matrices on both sides (transformers keeps HF's [E, in, out]) and the same YaRN.
    experts_hf = theirs.model.layers[cfg.num_layers - 1].mlp.experts
    for which, param in (("mlp1", experts_hf.gate_up_proj), ("mlp2", experts_hf.down_proj)):
        assert param.dtype == torch.float32
        np.testing.assert_array_equal(param.detach().numpy().transpose(0, 2, 1),
                                      weights.expert_weights_f32(cfg.num_layers - 1, which))
    inv_freq, concentration = yarn_inv_freq_and_scale(cfg)
    np.testing.assert_allclose(theirs.model.rotary_emb.inv_freq.numpy(), inv_freq, rtol=1e-6)
    assert theirs.model.rotary_emb.attention_scaling == pytest.approx(concentration)

    prompt = np.random.default_rng(cfg.num_heads).integers(0, cfg.vocab_size, 2 * cfg.sliding_window + 7).tolist()
    ours_tokens = greedy_generate(ours, prompt, STEPS)  # prefill, then decode through our KV cache
    with torch.no_grad():
        generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False)
    theirs_tokens = generated[0, len(prompt):].tolist()
    assert ours_tokens == theirs_tokens

    sequence = prompt + ours_tokens  # 71 positions on TINY_REAL_HEADS: past its window of 16 several times
    ours_logits = ours.forward(sequence, ours.new_cache())
    with torch.no_grad():
        theirs_logits = theirs(torch.tensor([sequence])).logits[0].numpy()
    err = max_rel(ours_logits, theirs_logits)
    print(f"{cfg.num_heads} heads, {experts} experts: max relative logit error {err:.2e}")
    assert err <= 1e-4
