"""The GPU model as a model runner: the weights uploaded once, the kernels compiled, and a GPUModel
(KV cache, step buffers, captured graphs) sized by the memory plan whenever the engine asks.

The memory plan counts what GPUModel will allocate from the shapes it allocates (GPUModel.nbytes:
the KV cache's rings, pages and staging cache, the step buffers, the decode partials), so it cannot
drift from them.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..batch import StepBatch
from ..config import ModelConfig
from ..errors import ModelTooLargeError
from ..gpu_weights import (DeviceWeights, check_dense_experts, dense_expert_bytes, free_gpu_memory, gib,
                           weight_bytes)
from ..kv_cache import KVCache, pages_per_slot
from ..model import GPUModel
from .config import EngineConfig
from .pages import pages_for
from .runner import Layout

HEADROOM = 1 << 30  # GPU memory left unplanned: CuPy pool fragmentation, kernels' scratch, RoPE table, graphs


@dataclass(frozen=True)
class MemoryPlan:
    slots: int
    pages: int
    capacity: int
    max_step_tokens: int
    bytes: int  # what the GPUModel of this plan allocates beside the weights (GPUModel.nbytes)


def plan_memory(cfg: ModelConfig, free_bytes: int, capacity: int, wanted_slots: int,
                mean_positions: int | None = None, config: EngineConfig = EngineConfig(),
                ranks: int | None = None) -> MemoryPlan:
    """Slots and KV pages that fit in free_bytes (less HEADROOM). The slot count is the largest for
    which every slot can hold `mean_positions` positions (a running sequence's expected length;
    default `capacity`, i.e. no sharing) and one sequence its whole capacity; every byte left then
    goes to pages (at most a whole capacity per slot). ranks: a tensor-parallel rank of that many
    (cfg is then its shard's config; its collective buffers are counted too)."""
    width = pages_per_slot(capacity)
    mean_pages = int(pages_for(max(1, min(mean_positions or capacity, capacity))))

    def step_tokens(slots: int) -> int:  # every decode token and the prefill budget
        return config.step_tokens(slots, capacity)[0]

    def nbytes(slots: int, pages: int) -> int:
        return GPUModel.nbytes(cfg, slots, capacity, step_tokens(slots), pages, ranks=ranks,
                               kv_cache_dtype=config.kv_cache_dtype)

    budget = free_bytes - HEADROOM
    lo, hi = 0, max(1, wanted_slots)
    while lo < hi:  # largest slot count whose model fits with the pages its slots need
        mid = (lo + hi + 1) // 2
        if nbytes(mid, max(width, mid * mean_pages)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ModelTooLargeError(
            f"no room for even one sequence of {capacity} tokens: it needs "
            f"{gib(nbytes(1, width))} of GPU memory beside the weights and {gib(max(budget, 0))} is left. "
            "Lower -n or shorten the prompts.")
    pages = min((budget - nbytes(lo, 0)) // KVCache.page_bytes(cfg, config.kv_cache_dtype),
                lo * width)  # (ranks: page bytes alike)
    return MemoryPlan(lo, int(pages), capacity, step_tokens(lo), nbytes(lo, int(pages)))


class GPUModelRunner:
    """collective: a tensor-parallel rank's (gptoss.parallel.collective; `weights` is then its share,
    gptoss.parallel.shard_weights.ShardWeights); None on one GPU."""

    def __init__(self, weights, config: EngineConfig | None = None, progress: bool = True, collective=None):
        import cupy

        self.config = config = config or EngineConfig()
        self.model_config: ModelConfig = weights.config
        self.collective = collective
        self.device_name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())["name"].decode()
        self.name = f"gpu ({self.device_name})"
        from ..kernels import KernelOptions, compile_all

        # the kernel choices, decided once here (GPTOSS_WGMMA read now, not per launch); before the weights,
        # whose dense expert copy needs the wgmma kernels
        self.kernels = (config.kernels if config.kernels is not None else KernelOptions.from_env()).resolve()
        if config.dense_experts:
            check_dense_experts(weights.experts_format, self.kernels)
        # (a tensor-parallel rank's ShardWeights holds local_experts of them)
        dense = (dense_expert_bytes(weights.config, getattr(weights, "local_experts", None))
                 if config.dense_experts else 0)
        need = weight_bytes(weights) + dense
        if config.memory_limit is not None and need + HEADROOM >= config.memory_limit:
            copy, drop = (", the dense expert copy included", " or drop --dense-experts") if dense else ("", "")
            raise ModelTooLargeError(
                f"a GPU memory limit of {gib(config.memory_limit)} leaves no room beside the weights "
                f"({gib(need)}{copy}); raise --gpu-memory{drop}")
        with _out_of_memory_as_error("the weights"):
            self.weights = DeviceWeights(weights, progress=progress, dense_experts=config.dense_experts,
                                         kernels=self.kernels)
        notes = ["portable kernels"] * self.kernels.portable  # (every AMD GPU; --kernels portable elsewhere)
        notes += [f"{config.kv_cache_dtype} KV cache"] * (config.kv_cache_dtype != "bf16")
        notes += ["dense experts"] * config.dense_experts
        self.name = f"gpu ({', '.join([self.device_name, *notes])})"
        t0 = time.perf_counter()
        compile_all(self.kernels)  # NVRTC on the first run (tens of seconds), CuPy's disk cache afterwards
        if progress and time.perf_counter() - t0 > 2:
            print(f"compiled the GPU kernels in {time.perf_counter() - t0:.0f} s (cached for later runs)",
                  file=sys.stderr)
        self.model: GPUModel | None = None

    def peak_memory_bytes(self) -> int:
        import cupy

        return cupy.get_default_memory_pool().total_bytes()

    def free_bytes(self) -> int:
        """GPU bytes this runner may plan with once its model is dropped (--gpu-memory applied)."""
        import cupy

        self.model = None
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        free, _ = free_gpu_memory()
        if self.config.memory_limit is not None:
            free = min(free, self.config.memory_limit - pool.used_bytes())
        return free

    def slots_for(self, capacity: int, slots: int, mean_positions: int) -> int:
        """The slots allocate(capacity, slots, mean_positions) would give (drops the model, as it does)."""
        ranks = None if self.collective is None else self.collective.size
        return plan_memory(self.model_config, self.free_bytes(), capacity, slots, mean_positions, self.config,
                           ranks).slots

    def allocate(self, capacity: int, slots: int, mean_positions: int | None = None,
                 free_bytes: int | None = None) -> Layout:
        """free_bytes: plan with this many (tensor parallel: the least any rank has, so that every rank
        builds the same plan); default what this GPU has (free_bytes())."""
        free = self.free_bytes()  # (drops the last model first)
        free = free if free_bytes is None else free_bytes  # every rank the same plan, from the same bytes
        ranks = None if self.collective is None else self.collective.size
        plan = plan_memory(self.model_config, free, capacity, slots, mean_positions, self.config, ranks)
        pages = plan.pages
        if self.config.num_pages is not None:
            if self.config.num_pages < pages_per_slot(capacity):
                raise ValueError(f"num_pages={self.config.num_pages} cannot hold one sequence of {capacity} "
                                 f"positions ({pages_per_slot(capacity)} pages)")
            pages = min(pages, self.config.num_pages)
        with _out_of_memory_as_error("the KV cache and step buffers"):
            self.model = GPUModel(self.weights, plan.slots, capacity, plan.max_step_tokens, pages=pages,
                                  kernels=self.kernels, collective=self.collective,
                                  kv_cache_dtype=self.config.kv_cache_dtype)
        # host memory for preempted sequences' KV: EngineConfig.swap_space, at most half of what is available
        kv_dtype = self.config.kv_cache_dtype
        page = KVCache.page_bytes(self.model_config, kv_dtype)
        rings = KVCache.slot_bytes(self.model_config, capacity, kv_dtype)
        swap = min(self.config.swap_space * 2**30, available_host_bytes() // 2)
        return Layout(plan.slots, capacity, pages, self.model.max_step_tokens,
                      self.config.step_tokens(plan.slots, capacity)[1], swap_pages=int(swap // page),
                      slot_pages=-(-rings // page))

    overlaps = True  # step() calls while_running between queueing the step and waiting for it

    def step(self, batch: StepBatch, while_running=None) -> np.ndarray:
        return self.model.step(batch, use_graph=self.config.use_graphs, while_running=while_running)


def available_host_bytes() -> int:
    """Host memory available now (Linux's MemAvailable; its free pages where /proc/meminfo is not there,
    0 where neither can be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class _out_of_memory_as_error:
    """CuPy's OutOfMemoryError (another process took the memory the plan counted on) as a
    ModelTooLargeError with one line to show."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        import cupy

        if kind is not None and issubclass(kind, cupy.cuda.memory.OutOfMemoryError):
            raise ModelTooLargeError(f"the GPU ran out of memory for {self.what} ({error}); free the GPU "
                                     "from other processes or lower --gpu-memory") from None
        return False
