"""EngineConfig: every setting of the engine, fixed when it starts (no module globals, no environment)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ops.attention import KV_DTYPES as KV_CACHE_DTYPES  # (host-side: the module imports no GPU library)


@dataclass(frozen=True)
class EngineConfig:
    """max_seqs: most sequences in flight at once (run.py -b); None = as many as the KV cache holds
        (on the CPU: every waiting request).
    prefill_tokens: most prompt tokens one step prefills, over all sequences; one sequence may take all
        of them (a lone long prompt is prefilled prefill_tokens at a time).
    promise: admission promises each sequence KV pages for its prompt and this share of its token
        budget. 1: no sequence is ever preempted; below 1, more sequences run at once and one that needs
        a page when none is free preempts the latest admitted, which resumes later (swap_space). None
        (the default): chosen when the cache is sized for the waiting requests: 1 where they all fit
        with their whole budgets, else the largest of 0.9, 0.8, ..., 0.5 at which every one of them gets
        a slot at once (one wave instead of two; those that run out of pages near their end are
        preempted), else 1 (a runner without `slots_for`: 1).
    swap_space: GiB of host memory for the KV of preempted sequences (run.py --swap-space): a preempted
        sequence's KV is copied there and back when it resumes, instead of being prefilled again (at
        most half the host's available memory; 0: always prefill again).
    memory_limit: most GPU bytes the run may hold in all, weights included (run.py --gpu-memory);
        None = all that is free.
    num_pages: KV pages of 64 positions, instead of all that memory holds (tests of preemption).
    use_graphs: replay decode-only steps from captured CUDA graphs.
    kernels: the GPU kernels' choices (gptoss.kernels.KernelOptions: the mode "auto" or "portable" --
        run.py --kernels --, wgmma); None = KernelOptions.from_env() (GPTOSS_KERNELS, GPTOSS_WGMMA), read
        once when the model is built.
    kv_cache_dtype: the KV cache's element format: "bf16", or "fp8" (OCP e4m3, scale 1: half the bytes,
        so about twice the KV pages in the same memory, and half the bytes attention reads; K and V
        rounded to 3 mantissa bits). The CPU reference emulates it (K and V rounded to e4m3 in float32).
    dense_experts: keep a bf16 copy of the MXFP4 expert weights on the GPU beside them, which the expert
        GEMMs of large steps (prefill, big decode batches) read instead of dequantizing MXFP4 (run.py
        --dense-experts). Costs 4x the MXFP4 expert bytes (gpt-oss-20b: about 36 GiB more; 120b: about
        214 GiB, more than one GPU holds). Only the wgmma expert kernels (H100/H200) read it, so the GPU
        runner refuses it for bf16 experts, the portable kernels, AMD and GPTOSS_WGMMA=0.
    """

    max_seqs: int | None = None
    prefill_tokens: int = 8192
    promise: float | None = None
    swap_space: float = 16.0
    memory_limit: int | None = None
    num_pages: int | None = None
    use_graphs: bool = True
    kernels: object | None = None
    kv_cache_dtype: str = "bf16"
    dense_experts: bool = False

    def step_tokens(self, slots: int, capacity: int) -> tuple[int, int]:
        """(tokens one step may carry, prompt tokens of one sequence one step may carry) for `slots`
        sequences of up to `capacity` positions: a decode token for every slot beside the prefill budget,
        which one sequence may take whole."""
        chunk = min(self.prefill_tokens, capacity)
        return slots + min(self.prefill_tokens, slots * chunk), chunk

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.kv_cache_dtype!r})")
        for name in ("max_seqs", "num_pages", "memory_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (got {value})")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1 (got {self.prefill_tokens})")
        if not self.swap_space >= 0:
            raise ValueError(f"swap_space must be at least 0 GiB (got {self.swap_space})")
        if self.promise is not None and not 0.0 <= self.promise <= 1.0:
            raise ValueError(f"promise must be in [0, 1] (got {self.promise})")
