"""The GPU KV cache: K and V per layer in bf16 (uint16 bits) or FP8 (uint8 OCP e4m3 codes, half the bytes:
`kv_dtype` "fp8", EngineConfig.kv_cache_dtype), and the kernels' copy of the page table.

Sliding layers: [slots, window, Hkv, D], a ring of exactly the window per slot (position p at row
p % window; the whole capacity where that is shorter). A prompt chunk goes through a staging cache
(stage_k, stage_v: [stage_pages + 1, PAGE, Hkv, D], shared by the sliding layers, which use it in turn;
gptoss/batch.py WindowPlan), since its keys would overwrite the older ones its first queries read.
Full layers: [pages + 1, PAGE, Hkv, D], pages the slots share through a page table
[slots, ceil(capacity / PAGE)] int32: position p of slot s sits in page table[s, p // PAGE]. The last
page is a spare: every entry not given to a sequence points there, so a stray write (a padding
row of a captured decode step) lands there and nowhere else.

Without `pages` each slot owns the pages of its whole capacity for good (tests and benchmarks of one
step). With `pages` the table starts all spare and the engine's page pool (gptoss/engine/pages.py, the
one owner of the table's host copy) hands pages out: set_page_table copies its table here, and
update_page_table the entries that changed.

A preempted sequence's KV can leave the GPU and come back into other pages and another slot
(copy_out / copy_in: the engine's swap, StepBatch.swaps): its pages' rows of every full layer and its
slot's ring of every sliding layer, through pinned host memory, queued on the current stream like the
steps' kernels, so no host wait is needed.
"""
from __future__ import annotations

import numpy as np

from .batch import WindowPlan
from .config import ModelConfig
from .ops.attention import TILE, kv_numpy_dtype

PAGE = TILE  # positions per page of the full layers' cache: one attention tile, the kernels' smallest page
STAGE_GROUP_SEQS = 64  # prompt chunks one sliding-layer launch stages (WindowPlan), which sizes the staging cache


def pages_per_slot(capacity: int) -> int:
    return -(-capacity // PAGE)


class KVCache:
    def __init__(self, cfg: ModelConfig, slots: int, capacity: int, pages: int | None = None,
                 kv_dtype: str = "bf16", stage_tokens: int = 0):
        """stage_tokens: most tokens of the prompt chunks one step stages (its token budget)."""
        import cupy

        if capacity <= 0 or slots <= 0:
            raise ValueError(f"a KV cache needs slots and capacity > 0, got {slots} and {capacity}")
        self.slots, self.capacity = slots, capacity
        self.kv_dtype = kv_dtype
        dtype = kv_numpy_dtype(kv_dtype)
        self.width = pages_per_slot(capacity)
        self.pages = slots * self.width if pages is None else int(pages)
        if self.pages <= 0:
            raise ValueError(f"a paged KV cache needs at least one page, got {pages}")
        self.spare = self.pages
        if pages is None:
            table = np.arange(self.pages, dtype=np.int32).reshape(slots, self.width)
        else:
            table = np.full((slots, self.width), self.spare, np.int32)
        self.table = cupy.asarray(table)
        self.k, self.v = [], []
        self.sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        self._in_flight: list = []  # (event, pinned arrays) of queued copies, kept until the stream passes them
        for i in range(cfg.num_layers):
            shape = self.layer_shape(cfg, i, slots, capacity, self.pages)
            self.k.append(cupy.empty(shape, dtype=dtype))
            self.v.append(cupy.empty(shape, dtype=dtype))
        self.window = cfg.sliding_window if self.staged(cfg, capacity) else None  # rings that need staging
        self.stage_pages = self.staging_pages(cfg, capacity, stage_tokens)
        shape = self.stage_shape(cfg, self.stage_pages)
        self.stage_k, self.stage_v = (cupy.empty(shape, dtype=dtype) for _ in range(2))

    @staticmethod
    def staged(cfg: ModelConfig, capacity: int) -> bool:
        """Whether prompt chunks go through the staging cache: some layer slides over a window shorter
        than the capacity (its ring wraps)."""
        return any(cfg.is_sliding(i) for i in range(cfg.num_layers)) and cfg.sliding_window < capacity

    @classmethod
    def staging_pages(cls, cfg: ModelConfig, capacity: int, stage_tokens: int) -> int:
        """Pages of the staging cache for steps of up to stage_tokens tokens (0 where nothing is staged)."""
        if not cls.staged(cfg, capacity) or stage_tokens <= 0:
            return 0
        return WindowPlan.pages(stage_tokens, cfg.sliding_window, PAGE, STAGE_GROUP_SEQS)

    @staticmethod
    def stage_shape(cfg: ModelConfig, stage_pages: int) -> tuple:
        """The shape of the staging cache's K (and V): stage_pages and a spare page, or none at all."""
        return (stage_pages + 1 if stage_pages else 0, PAGE, cfg.num_kv_heads, cfg.head_dim)

    @staticmethod
    def layer_shape(cfg: ModelConfig, layer: int, slots: int, capacity: int, pages: int) -> tuple:
        """The shape of layer `layer`'s K (and V) array (elements of the cache's dtype)."""
        if cfg.is_sliding(layer):
            return (slots, min(capacity, cfg.sliding_window), cfg.num_kv_heads, cfg.head_dim)
        return (pages + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)

    @classmethod
    def nbytes(cls, cfg: ModelConfig, slots: int, capacity: int, pages: int, kv_dtype: str = "bf16",
               stage_tokens: int = 0) -> int:
        """GPU bytes of a cache of these dimensions: every layer's K and V, the page table and the
        staging cache."""
        size = kv_numpy_dtype(kv_dtype).itemsize
        kv = sum(2 * size * int(np.prod(cls.layer_shape(cfg, i, slots, capacity, pages)))
                 for i in range(cfg.num_layers))
        stage = 2 * size * int(np.prod(cls.stage_shape(cfg, cls.staging_pages(cfg, capacity, stage_tokens))))
        return kv + slots * pages_per_slot(capacity) * 4 + stage

    @classmethod
    def slot_bytes(cls, cfg: ModelConfig, capacity: int, kv_dtype: str = "bf16") -> int:
        """GPU bytes of one more slot's rings (the sliding layers' K and V), what a swap copies beside the
        sequence's pages."""
        one, two = (cls.nbytes(cfg, n, capacity, 0, kv_dtype) for n in (1, 2))
        return two - one - pages_per_slot(capacity) * 4  # (less the page table's row)

    @classmethod
    def page_bytes(cls, cfg: ModelConfig, kv_dtype: str = "bf16") -> int:
        """GPU bytes of one more page (PAGE positions of every full layer)."""
        return cls.nbytes(cfg, 1, PAGE, 1, kv_dtype) - cls.nbytes(cfg, 1, PAGE, 0, kv_dtype)

    def copy_out(self, slot: int, pages: np.ndarray) -> list:
        """The slot's rings and the rows of `pages` (position order) of every layer's K and V, as pinned
        host arrays whose copies are queued on the current stream (valid once it gets there)."""
        import cupy

        stream, index = cupy.cuda.get_current_stream(), cupy.asarray(np.asarray(pages, np.int32))
        host = []
        for a, ring in zip((*self.k, *self.v), self.sliding * 2):
            part = a[slot] if ring else a[index]  # its ring, or its pages gathered
            out = _pinned(part.shape, part.dtype)
            cupy.cuda.runtime.memcpyAsync(out.ctypes.data, part.data.ptr, part.nbytes,
                                          cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr)
            host.append(out)
        self._hold(stream, host)
        return host

    def copy_in(self, host: list, slot: int, pages: np.ndarray) -> None:
        """copy_out's arrays back into `slot`'s rings and the rows of `pages` (as many as it took),
        queued on the current stream."""
        import cupy

        stream, index = cupy.cuda.get_current_stream(), cupy.asarray(np.asarray(pages, np.int32))
        for a, ring, part in zip((*self.k, *self.v), self.sliding * 2, host):
            if part.shape[0] != (a.shape[1] if ring else len(pages)):
                raise ValueError(f"a swapped sequence of {part.shape[0]} pages comes back into {len(pages)}")
            dev = cupy.empty(part.shape, part.dtype)
            cupy.cuda.runtime.memcpyAsync(dev.data.ptr, part.ctypes.data, part.nbytes,
                                          cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
            if ring:
                a[slot] = dev
            else:
                a[index] = dev
        self._hold(stream, host)

    def _hold(self, stream, host: list) -> None:
        """Keeps the pinned arrays of copies just queued on `stream` until it has passed them, whatever the
        caller drops: freed earlier, CuPy's pinned pool could hand their memory to another transfer (its
        host-to-device staging writes into it from the host) while the copy still reads or writes it."""
        self._in_flight = [(event, kept) for event, kept in self._in_flight if not event.done]
        self._in_flight.append((stream.record(), host))

    def layer_table(self, layer: int, cfg: ModelConfig):
        """The page table for layer `layer`'s kernels: the device table on full layers, None on sliding."""
        return None if cfg.is_sliding(layer) else self.table

    def set_page_table(self, host: np.ndarray) -> None:
        """Copy the page pool's table [slots, width] to the device (on the current stream, before a step)."""
        if host.shape != tuple(self.table.shape):
            raise ValueError(f"a page table of shape {host.shape} for a cache of {tuple(self.table.shape)}")
        self.table.set(np.ascontiguousarray(host, np.int32))

    def apply_page_changes(self, table: np.ndarray | None, updates: np.ndarray | None) -> None:
        """A step's page-table change (StepBatch.page_table / page_updates): the whole table, or entries."""
        if table is not None:
            self.set_page_table(table)
        elif updates is not None:
            self.update_page_table(updates)

    def update_page_table(self, updates: np.ndarray) -> None:
        """Set some entries of the device table: updates [2, n] int32, flat indices into the table
        [slots, width] (each at most once) and their values (one copy to the device, one scatter)."""
        import cupy

        updates = np.ascontiguousarray(updates, np.int32)
        if updates.ndim != 2 or updates.shape[0] != 2:
            raise ValueError(f"page-table updates must be [2, n] (indices, values), got {updates.shape}")
        if not updates.shape[1]:
            return
        if updates[0].min() < 0 or updates[0].max() >= self.table.size:
            raise ValueError(f"a page-table index outside the table's {self.table.size} entries")
        dev = cupy.asarray(updates)
        self.table.reshape(-1)[dev[0]] = dev[1]


def _pinned(shape, dtype) -> np.ndarray:
    """A host array in page-locked memory (CuPy's pinned pool), so that copies to and from it are
    asynchronous."""
    import cupy

    count = int(np.prod(shape))
    mem = cupy.cuda.alloc_pinned_memory(max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(mem, dtype, count).reshape(shape)
