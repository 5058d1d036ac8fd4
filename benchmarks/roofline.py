"""The bytes and flops each kernel family of one engine step must move and do, and the share of its
roofline a measured profile (gptoss.model.GPUModel.profile: milliseconds per family) reaches.

The model counts, per family, what the step cannot avoid given the buffers the forward keeps:
- weights read once (dense matrices and biases bf16; MXFP4 experts 0.5 byte per weight plus one scale
  byte per 32 weights, bf16 experts 2 bytes; norm scales and sinks float32), only the experts the step's
  tokens touch (`experts_touched`: at one token exactly k, for B tokens by default the expectation under
  uniform routing, E * (1 - (1 - k/E)^B));
- activations read and written once each in the dtype the step buffers hold them (residual stream x and
  the router's input float32, the matmul inputs and outputs bf16, the expert outputs float32, logits
  float32); scratch a kernel may keep between its own launches (router partial sums, tile lists,
  attention partials) is not counted;
- the KV cache: each layer writes the step's K and V rows and its attention reads, per sequence, the K
  and V rows of every position the sequence's queries attend (full layers: all positions up to the last
  query; sliding layers: from the first query's window start).
Flops are 2 per multiply-add of the matmuls and attention (QK^T and PV over the attended positions,
causal); elementwise work (norms, RoPE, SwiGLU, softmax) is left out: it is far below any family's byte
bound. A family's roofline time is max(bytes / copy bandwidth, flops / tensor-core peak); its share is
that time over the measured one.
"""
from __future__ import annotations

from dataclasses import dataclass

from gptoss.config import ModelConfig

BF16, F32, I32 = 2, 4, 4
# the ceilings measured on this workplace's H200s: device-to-device copy and dense bf16 tensor-core GEMM
H200_COPY_TBPS = 4.3
H200_BF16_TFLOPS = 790.0

# the families GPUModel.profile times on one GPU, in step order; the tensor-parallel ones
# ("out gemm (rank)", "all-gather + reduce") have no model here and print without one
FAMILIES = ("embed + norm", "qkv gemm", "rope + kv write", "attention sliding", "attention full", "out gemm",
            "add + norm", "router", "moe dispatch", "moe mlp1 (gate/up + swiglu)", "moe mlp2 (down)",
            "moe combine + norm", "final norm + unembedding", "sampling")


@dataclass(frozen=True)
class Ceilings:
    copy_tbps: float = H200_COPY_TBPS
    bf16_tflops: float = H200_BF16_TFLOPS

    def bound_ms(self, work: "Work") -> float:
        """The roofline time of `work`: the slower of streaming its bytes and doing its flops."""
        return max(work.bytes / (self.copy_tbps * 1e9), work.flops / (self.bf16_tflops * 1e9))


@dataclass(frozen=True)
class Work:
    bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.bytes + other.bytes, self.flops + other.flops)

    def __mul__(self, n: float) -> "Work":
        return Work(self.bytes * n, self.flops * n)

    __rmul__ = __mul__


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in the step: positions start .. start + q_len - 1 (earlier ones cached)."""
    start: int
    q_len: int


@dataclass(frozen=True)
class StepShape:
    """What a step holds, as far as the work is concerned: its sequences' segments and its logit rows."""
    segments: tuple[Segment, ...]
    logit_rows: int

    @property
    def tokens(self) -> int:
        return sum(s.q_len for s in self.segments)

    @classmethod
    def decode(cls, batch: int, context: int) -> "StepShape":
        """`batch` sequences with `context` cached positions each, one new token each (at position context)."""
        return cls(tuple(Segment(context, 1) for _ in range(batch)), batch)

    @classmethod
    def prefill(cls, tokens: int, start: int = 0) -> "StepShape":
        """One prompt chunk of `tokens` tokens from position `start`; the logits of its last token."""
        return cls((Segment(start, tokens),), 1)


def expected_experts_touched(num_experts: int, k: int, tokens: int) -> float:
    """Distinct experts that `tokens` tokens, each routed to k distinct experts uniformly at random, touch
    on average: each expert is missed by one token with probability 1 - k/E. Exactly k at one token."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


def expert_bytes(rows: int, cols: int, experts_format: str) -> float:
    """Bytes of one expert's [rows, cols] matrix: MXFP4 is 16 bytes of 4-bit codes + 1 scale byte per 32."""
    if experts_format == "mxfp4":
        return rows * cols * (0.5 + 1.0 / 32)
    if experts_format == "bf16":
        return rows * cols * BF16
    raise ValueError(f"unknown experts format {experts_format!r} (mxfp4 or bf16)")


def attention_work(cfg: ModelConfig, step: StepShape, window: int) -> Work:
    """One layer's attention (window 0 = full): q read and output written once, the K and V rows of the
    positions the step's queries attend read once per sequence, 4 flops per (query head, dim, key)."""
    keys = attended = 0
    for s in step.segments:
        last = s.start + s.q_len  # one past the last query's position
        first = 0 if window == 0 else max(0, s.start - window + 1)
        keys += last - first
        # position p attends p + 1 keys (full) or min(p + 1, window) (sliding: its own included)
        attended += sum(p + 1 if window == 0 else min(p + 1, window) for p in range(s.start, last))
    T = step.tokens
    return Work(bytes=2 * BF16 * T * cfg.q_size + F32 * cfg.num_heads + 2 * BF16 * cfg.kv_size * keys,
                flops=4.0 * cfg.num_heads * cfg.head_dim * attended)


def family_work(cfg: ModelConfig, step: StepShape, experts_format: str = "mxfp4",
                experts_touched: float | None = None) -> dict[str, Work]:
    """Work per profile family for the whole step (all layers); attention families only for layer types
    the config has. experts_touched: distinct experts per layer (default expected_experts_touched)."""
    H, Q, KV, QKV, D = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.qkv_size, cfg.head_dim
    E, k, I, V, L = cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    T, R = step.tokens, step.logit_rows
    U = expected_experts_touched(E, k, T) if experts_touched is None else experts_touched
    if not 0 <= U <= E:
        raise ValueError(f"experts touched {U} is outside 0..{E}")
    sliding = sum(cfg.is_sliding(i) for i in range(L))
    work = {
        # ids, embedding rows, the first norm's scale in; x (float32) and t (bf16) out
        "embed + norm": Work(I32 * T + BF16 * T * H + F32 * H + F32 * T * H + BF16 * T * H),
        "qkv gemm": L * Work(BF16 * (QKV * H + QKV) + BF16 * T * H + BF16 * T * QKV, 2.0 * T * H * QKV),
        # qkv, the (cos, sin) float32 table rows, positions and slots in; q and the cache's K, V rows out
        "rope + kv write": L * Work(BF16 * T * QKV + F32 * T * D + 2 * I32 * T + BF16 * T * Q + 2 * BF16 * T * KV),
    }
    if sliding:
        work["attention sliding"] = sliding * attention_work(cfg, step, cfg.sliding_window)
    if L - sliding:
        work["attention full"] = (L - sliding) * attention_work(cfg, step, 0)
    work.update({
        "out gemm": L * Work(BF16 * (H * Q + H) + BF16 * T * Q + BF16 * T * H, 2.0 * T * Q * H),
        # x and o in, the norm scale; x, t (bf16) and t32 (float32, the router's input) out
        "add + norm": L * Work(F32 * T * H + BF16 * T * H + F32 * H + F32 * T * H + BF16 * T * H + F32 * T * H),
        "router": L * Work(F32 * T * H + BF16 * (E * H + E) + (I32 + F32) * T * k, 2.0 * T * H * E),
        # the step's expert ids in; per-expert offsets and the slots sorted by expert out
        "moe dispatch": L * Work(I32 * T * k + I32 * (E + 1) + I32 * T * k),
        "moe mlp1 (gate/up + swiglu)": L * Work(
            U * (expert_bytes(2 * I, H, experts_format) + BF16 * 2 * I) + BF16 * T * H + BF16 * T * k * I,
            2.0 * T * k * H * 2 * I),
        # y and the routing weights in; the weighted expert outputs (float32, one row per token and slot) out
        "moe mlp2 (down)": L * Work(
            U * (expert_bytes(H, I, experts_format) + BF16 * H) + BF16 * T * k * I + F32 * T * k + F32 * T * k * H,
            2.0 * T * k * I * H),
        # every layer but the last adds the k expert rows into x and writes the next norm's t; the last only adds
        "moe combine + norm": (L - 1) * Work(F32 * T * H + F32 * T * k * H + F32 * H + F32 * T * H + BF16 * T * H)
        + Work(F32 * T * H + F32 * T * k * H + F32 * T * H),
        "final norm + unembedding": Work(F32 * R * H + F32 * H + BF16 * V * H + F32 * R * V, 2.0 * R * H * V),
        "sampling": Work(F32 * R * V + I32 * R),  # greedy: the logits in, one id per row out
    })
    return work


@dataclass(frozen=True)
class Row:
    name: str
    ms: float
    work: Work | None = None  # None: a family without a model (printed with its time only)
    bound_ms: float | None = None
    limit: str = ""  # the ceiling that bounds it: "bytes" or "flops"

    @property
    def share(self) -> float | None:
        return self.bound_ms / self.ms if self.bound_ms is not None and self.ms > 0 else None


def _row(name: str, ms: float, work: Work | None, ceilings: Ceilings) -> Row:
    if work is None:
        return Row(name, ms)
    by_flops = work.flops / ceilings.bf16_tflops > work.bytes / ceilings.copy_tbps
    return Row(name, ms, work, ceilings.bound_ms(work), "flops" if by_flops else "bytes")


def roofline_rows(profile_ms: dict[str, float], work: dict[str, Work],
                  ceilings: Ceilings = Ceilings()) -> tuple[list[Row], Row, float]:
    """One row per profiled family (profile order), the step's sum row (its whole time against the whole
    step's roofline: all modelled bytes and flops together), and the sum of the families' own roofline
    times (the bound when the families run one after another)."""
    rows = [_row(name, ms, work.get(name), ceilings) for name, ms in profile_ms.items()]
    total = Work()
    for r in rows:
        if r.work is not None:
            total = total + r.work
    step = _row("step", sum(profile_ms.values()), total, ceilings)
    return rows, step, sum(r.bound_ms for r in rows if r.bound_ms is not None)


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def format_table(profile_ms: dict[str, float], work: dict[str, Work], ceilings: Ceilings = Ceilings(),
                 title: str = "") -> str:
    """A Markdown table: per family ms, GB moved, GFLOP, achieved TB/s and TFLOP/s, the roofline time and
    the share of it reached; then the step's sum row, and a line with the ceilings and the sum of the
    families' roofline times."""
    rows, step, bounds = roofline_rows(profile_ms, work, ceilings)

    def percent(part: float | None, whole: float) -> str:
        return _cell(None if part is None or whole <= 0 else 100 * part / whole, ".1f", "%")

    lines = [title] if title else []
    lines += ["| family | ms | of step | GB | GFLOP | TB/s | TFLOP/s | bound by | roofline ms | share of roofline |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    def tera_per_s(amount: float, ms: float) -> float | None:  # bytes or flops in ms -> TB/s or TFLOP/s
        return amount / ms / 1e9 if ms > 0 else None

    for r in rows + [step]:
        name = f"**{r.name}**" if r is step else r.name
        if r.work is None:
            moved = ["-"] * 4
        else:
            b, f = r.work.bytes, r.work.flops
            moved = [f"{b / 1e9:.3f}", f"{f / 1e9:.2f}", _cell(tera_per_s(b, r.ms), ".2f"), _cell(tera_per_s(f, r.ms), ".1f")]
        cells = [name, f"{r.ms:.3f}", percent(r.ms, step.ms), *moved, r.limit or "-", _cell(r.bound_ms, ".3f"),
                 percent(r.bound_ms, r.ms)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"ceilings: {ceilings.copy_tbps:g} TB/s copy, {ceilings.bf16_tflops:g} TFLOP/s bf16; the families' "
                 f"roofline times add up to {bounds:.3f} ms, {percent(bounds, step.ms)} of the step's time")
    return "\n".join(lines)
