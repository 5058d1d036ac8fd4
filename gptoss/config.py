"""Model hyper-parameters: one dataclass (from a Hugging Face config dict: gptoss.weights reads the file) and presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


MAX_INT = 2**31 - 1  # sizes reach the kernels as 32-bit ints
MAX_LAYERS = 4096  # far above any real model (gpt-oss-120b has 36); a corrupt count cannot build huge tables


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def short_repr(value) -> str:
    """A value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 24
    hidden_size: int = 2880
    num_heads: int = 64  # query heads
    num_kv_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    intermediate_size: int = 2880  # per expert
    vocab_size: int = 201088
    sliding_window: int = 128
    # layer i uses the sliding window when layer_types[i] == "sliding_attention"
    layer_types: tuple[str, ...] = field(default=())
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_initial_context: int = 4096  # YaRN's original_max_position_embeddings
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    max_context: int = 131072

    def __post_init__(self):
        # the scalars first: a corrupt num_layers must be refused before it sizes the default layer_types
        problems = self._scalar_problems()
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        for f in dataclasses.fields(self):
            if f.type == "float":
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        if not self.layer_types:
            types = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        elif isinstance(self.layer_types, (list, tuple)):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:  # rows of the fused qkv projection: q, then k, then v
        return self.q_size + 2 * self.kv_size

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def _scalar_problems(self) -> list[str]:
        """Every int field an int in 1..MAX_INT (kernels index with 32-bit ints), at most MAX_LAYERS layers;
        every float field a finite number, in the range its formula needs."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not _is_int(value) or not 0 < value <= MAX_INT):
                problems.append(f"{f.name} must be an integer in 1..{MAX_INT} (got {short_repr(value)})")
            if f.type == "float" and not (_is_real(value) and math.isfinite(value)):
                problems.append(f"{f.name} must be a finite number (got {short_repr(value)})")
        if problems:
            return problems
        if self.num_layers > MAX_LAYERS:
            problems.append(f"num_layers {self.num_layers} is more than {MAX_LAYERS}")
        if self.rope_theta <= 1:  # the RoPE base: frequencies theta^(-2i/d) must fall, and YaRN takes log(theta)
            problems.append(f"rope_theta must be above 1 (got {self.rope_theta})")
        if self.rope_scaling_factor <= 0:
            problems.append(f"rope_scaling_factor must be positive (got {self.rope_scaling_factor})")
        # YaRN's ramp runs from beta_fast rotations (low dims) down to beta_slow (high dims)
        if self.rope_scaling_factor > 1 and not self.rope_beta_fast > self.rope_beta_slow > 0:
            problems.append(f"rope_beta_fast ({self.rope_beta_fast}) must exceed rope_beta_slow "
                            f"({self.rope_beta_slow}), which must be positive")
        if self.swiglu_limit <= 0 or self.swiglu_alpha <= 0:
            problems.append(f"swiglu_limit and swiglu_alpha must be positive (got {self.swiglu_limit}, "
                            f"{self.swiglu_alpha})")
        if self.rms_norm_eps < 0:
            problems.append(f"rms_norm_eps must not be negative (got {self.rms_norm_eps})")
        return problems

    def validate(self) -> None:
        problems = self._scalar_problems()
        if not problems:
            if self.num_heads % self.num_kv_heads:
                problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
            if self.head_dim % 2:
                problems.append(f"head_dim {self.head_dim} must be even for RoPE")
            if self.experts_per_token > self.num_experts:
                problems.append(f"experts_per_token {self.experts_per_token} > num_experts {self.num_experts}")
            if self.hidden_size % 32 or self.intermediate_size % 32:
                problems.append("hidden_size and intermediate_size must be multiples of 32 (MXFP4 blocks)")
            if not (isinstance(self.layer_types, tuple) and all(isinstance(t, str) for t in self.layer_types)):
                problems.append(f"layer_types must be a list of names (got {short_repr(self.layer_types)})")
            elif len(self.layer_types) != self.num_layers:
                problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            else:
                bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
                if bad:
                    problems.append(f"unknown layer types {short_repr(bad)}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object (got {short_repr(d)})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "ModelConfig":
        """Map a Hugging Face GptOss config.json (transformers 4.55+ or 5.x) onto our fields."""
        def integer(*keys, default=None):
            """The first of `keys` that is set (or the default), which must be an integer."""
            for key in keys:
                if hf.get(key) is not None:
                    if not _is_int(hf[key]):
                        raise ValueError(f"{key} must be an integer (got {short_repr(hf[key])})")
                    return hf[key]
            if default is None:
                raise ValueError(f"config.json lacks {' / '.join(keys)}")
            return default

        def real(key, value):
            if not _is_real(value):
                raise ValueError(f"{key} must be a number (got {short_repr(value)})")
            try:
                return float(value)
            except OverflowError:
                raise ValueError(f"{key} {short_repr(value)} is too large") from None

        def table(key):
            value = hf.get(key) or {}
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be an object (got {short_repr(value)})")
            return value

        # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters (holding rope_theta too)
        rope = dict(table("rope_scaling"))
        rope.update(table("rope_parameters"))
        theta = rope.get("rope_theta", hf.get("rope_theta", 150000.0))
        initial_context = rope.get("original_max_position_embeddings", hf.get("initial_context_length", 4096))
        if not _is_int(initial_context):
            raise ValueError("original_max_position_embeddings must be an integer (got "
                             f"{short_repr(initial_context)})")
        layer_types = hf.get("layer_types") or ()
        if not isinstance(layer_types, list | tuple):
            raise ValueError(f"layer_types must be a list (got {short_repr(layer_types)})")
        return cls(
            num_layers=integer("num_hidden_layers"),
            hidden_size=integer("hidden_size"),
            num_heads=integer("num_attention_heads"),
            num_kv_heads=integer("num_key_value_heads"),
            head_dim=integer("head_dim"),
            num_experts=integer("num_local_experts", "num_experts"),
            experts_per_token=integer("num_experts_per_tok", "experts_per_token"),
            intermediate_size=integer("intermediate_size"),
            vocab_size=integer("vocab_size"),
            sliding_window=integer("sliding_window", default=128),
            layer_types=tuple(layer_types),
            rope_theta=real("rope_theta", theta),
            rope_scaling_factor=real("factor", rope.get("factor", 32.0)),
            rope_initial_context=initial_context,
            rope_beta_fast=real("beta_fast", rope.get("beta_fast", 32.0)),
            rope_beta_slow=real("beta_slow", rope.get("beta_slow", 1.0)),
            swiglu_limit=real("swiglu_limit", hf.get("swiglu_limit", 7.0)),
            rms_norm_eps=real("rms_norm_eps", hf.get("rms_norm_eps", 1e-5)),
            max_context=integer("max_position_embeddings", default=131072),
        )

    def to_hf_dict(self, quantized_experts: bool = True) -> dict:
        """A config.json that transformers' GptOssForCausalLM accepts (both 4.55+ and 5.x keys)."""
        rope = {"rope_type": "yarn", "factor": self.rope_scaling_factor, "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow, "truncate": False,
                "original_max_position_embeddings": self.rope_initial_context}
        d = {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token, "experts_per_token": self.experts_per_token,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta, "rope_scaling": rope,
            "rope_parameters": dict(rope, rope_theta=self.rope_theta),
            "initial_context_length": self.rope_initial_context,
            "swiglu_limit": self.swiglu_limit, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_context, "attention_bias": True,
            "attention_dropout": 0.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        # the real models' <|return|> and <|endoftext|>; a tiny vocabulary has no such ids (and
        # transformers refuses a pad id outside the vocabulary)
        for key, token in (("eos_token_id", 200002), ("pad_token_id", 199999)):
            if token < self.vocab_size:
                d[key] = token
        if quantized_experts:
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}
        return d

    # ---- work per token (rooflines) --------------------------------------------------------------
    def active_matmul_params_per_token(self) -> int:
        """Multiply-adds per token in weight matrices (attention, active experts, router, unembedding)."""
        H = self.hidden_size
        per_layer = (H * self.qkv_size + self.q_size * H + H * self.num_experts
                     + self.experts_per_token * (H * 2 * self.intermediate_size + self.intermediate_size * H))
        return self.num_layers * per_layer + self.vocab_size * H


def yarn_inv_freq_and_scale(cfg: ModelConfig):
    """YaRN inverse frequencies (head_dim/2 of them) and the cos/sin concentration factor."""
    import numpy as np

    d_half = cfg.head_dim // 2
    base = cfg.rope_theta ** (np.arange(d_half, dtype=np.float64) * 2.0 / cfg.head_dim)
    if cfg.rope_scaling_factor <= 1.0:
        return (1.0 / base), 1.0
    low = d_half * math.log(cfg.rope_initial_context / (cfg.rope_beta_fast * 2 * math.pi)) / math.log(cfg.rope_theta)
    high = d_half * math.log(cfg.rope_initial_context / (cfg.rope_beta_slow * 2 * math.pi)) / math.log(cfg.rope_theta)
    ramp = np.clip((np.arange(d_half, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    interpolated = 1.0 / (cfg.rope_scaling_factor * base)
    extrapolated = 1.0 / base
    inv_freq = interpolated * ramp + extrapolated * (1.0 - ramp)
    concentration = 0.1 * math.log(cfg.rope_scaling_factor) + 1.0
    return inv_freq, concentration


GPT_OSS_20B = ModelConfig(num_layers=24, num_experts=32)
GPT_OSS_120B = ModelConfig(num_layers=36, num_experts=128)

# Tiny shapes for tests: small enough for the NumPy reference and CI.
TINY = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4,
                   experts_per_token=2, intermediate_size=64, vocab_size=512, sliding_window=8,
                   max_context=256)
# Real head geometry (64 q / 8 kv heads of 64), small elsewhere: a prompt can run past the window.
TINY_REAL_HEADS = ModelConfig(num_layers=2, hidden_size=128, num_heads=64, num_kv_heads=8, head_dim=64,
                              num_experts=8, experts_per_token=4, intermediate_size=96, vocab_size=1024,
                              sliding_window=16, max_context=512)

# TINY with the real vocabulary, so text prompts and the harmony chat format run on it (README's first run).
TINY_CHAT = dataclasses.replace(TINY, vocab_size=201088)

PRESETS = {"gpt-oss-20b": GPT_OSS_20B, "gpt-oss-120b": GPT_OSS_120B, "tiny": TINY,
           "tiny-real-heads": TINY_REAL_HEADS, "tiny-chat": TINY_CHAT}
