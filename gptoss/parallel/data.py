"""Data parallel getp: N engine replicas, one worker process each, fed from one queue.

    run.py MODEL -m getp -i prompts.txt -o out.txt --data-parallel 3 --device cpu   # 3 CPU workers
    run.py MODEL -m getp -i prompts.txt -o out.txt --gpus 0,2,3                     # one replica per GPU

The parent process reads and tokenizes the prompts, opens OUTPUT.partial (the single-process format
and fingerprint, so either kind of run resumes the other), and puts the prompts still to run on one
queue, longest first, so that the replicas finish together. Each worker (a `spawn`ed process) builds its
own LLM (its weights copy and KV cache; on a GPU, after making its GPU CuPy's current device), takes
prompts from the queue while it has free slots, and sends each finished prompt back. A prompt's draws
use its input line as the sampler's sequence id, and a prompt's tokens never depend on its batch, so
the output is byte-identical to one worker's, greedy or sampled.

The parent appends finished prompts to OUTPUT.partial, drives the one progress bar, and writes OUTPUT
atomically in input order. A worker that raises, or dies, stops the run with a ReplicaError naming the
replica (and its GPU); what finished before stays in OUTPUT.partial for --resume.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.config import EngineConfig
from ..errors import GptossError, one_line

# Test hook: "L" makes the replica that finishes input line L (0-based) send it, then exit abruptly;
# "L:raise" makes it raise instead.
CRASH_ENV = "GPTOSS_TEST_REPLICA_EXIT"
# Prompts a GPU worker holds at once when -b is not given (its engine batches as many as its cache holds).
GPU_INFLIGHT = 256


@dataclass(frozen=True)
class ReplicaSettings:
    """What every engine replica's LLM is built with, however the replicas are laid out: tokenizer (a
    file, run.py --tokenizer), max_seqs (run.py -b), memory_limit (--gpu-memory, per replica and rank, in
    bytes), kernels (a gptoss.kernels.KernelOptions, run.py --kernels; None: from the environment),
    kv_cache_dtype (run.py --kv-cache-dtype: "bf16" or "fp8"), prefill_tokens (run.py --prefill-tokens),
    swap_space (--swap-space), dense_experts (run.py --dense-experts: EngineConfig.dense_experts)."""
    tokenizer: str | None = None
    max_seqs: int | None = None
    memory_limit: int | None = None
    kernels: object | None = None
    kv_cache_dtype: str = "bf16"
    prefill_tokens: int = EngineConfig.prefill_tokens
    swap_space: float = EngineConfig.swap_space
    dense_experts: bool = False

    def inflight(self, device: str) -> int:
        """Prompts a replica holds at once: -b, else one on the CPU and GPU_INFLIGHT on a GPU."""
        return self.max_seqs or (1 if device == "cpu" else GPU_INFLIGHT)


class ReplicaError(GptossError, RuntimeError):
    """A replica failed (an exception, a killed process); the message is one line naming it: `who`
    (e.g. "replica 1 (GPU 2)") then `what` (e.g. "failed: RuntimeError: ...")."""

    def __init__(self, message: str, who: str = "", what: str = ""):
        super().__init__(message)
        self.who, self.what = who, what


@dataclass(frozen=True)
class DataParallelOptions:
    """replicas: engine replicas, one worker process each. device: "cpu" (the NumPy reference) or "gpu".
    gpus: the GPUs (gpu only); replica r runs on gpus[r % len(gpus)], or with tensor_parallel N > 1 on
    gpus[r N .. r N + N - 1] (its ranks; the replicas then need N x replicas GPUs). settings: what each
    replica's LLM is built with."""
    replicas: int = 1
    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    tensor_parallel: int = 1
    settings: ReplicaSettings = ReplicaSettings()

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"the number of replicas must be at least 1 (got {self.replicas})")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu (got {self.device!r})")
        if self.device == "gpu" and not self.gpus:
            raise ValueError("a GPU run needs at least one GPU")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be at least 1 (got {self.tensor_parallel})")
        if self.device == "gpu" and self.tensor_parallel > 1 and self.replicas * self.tensor_parallel > len(self.gpus):
            raise ValueError(f"{self.replicas} replicas of {self.tensor_parallel} tensor-parallel ranks need "
                             f"{self.replicas * self.tensor_parallel} GPUs; {len(self.gpus)} given")

    def gpus_of(self, replica: int) -> tuple[int, ...] | None:
        """The GPUs of a replica's ranks (one without tensor parallel); None on the CPU."""
        if self.device != "gpu":
            return None
        n = self.tensor_parallel
        if n == 1:
            return (self.gpus[replica % len(self.gpus)],)
        return self.gpus[replica * n:(replica + 1) * n]

    def gpu_of(self, replica: int) -> int | None:
        gpus = self.gpus_of(replica)
        return gpus[0] if gpus else None

    def name(self, replica: int) -> str:
        gpus = self.gpus_of(replica)
        if gpus is None:
            where = "CPU worker" if self.tensor_parallel == 1 else f"{self.tensor_parallel} CPU ranks"
        else:
            where = f"GPU{'s' if len(gpus) > 1 else ''} {','.join(map(str, gpus))}"
        return f"replica {replica} ({where})"


def parse_gpus(text: str) -> tuple[int, ...]:
    """`0,2,3` or `0-3` (or a mix: `0-1,4`) -> the GPU ids, in order, each once; ValueError if bad."""
    gpus: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            ids = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"--gpus {text}: expected GPU numbers such as 0,2,3 or 0-3") from None
        for g in ids:
            if g < 0:
                raise ValueError(f"--gpus {text}: GPU numbers start at 0")
            if g in gpus:
                raise ValueError(f"--gpus {text}: GPU {g} is named twice")
            gpus.append(g)
    if not gpus:
        raise ValueError(f"--gpus {text}: no GPU named")
    return tuple(gpus)


def visible_gpus() -> tuple[int, ...]:
    """Every GPU CuPy sees (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES apply)."""
    import cupy

    return tuple(range(cupy.cuda.runtime.getDeviceCount()))


@dataclass(frozen=True)
class _Worker:
    """What one worker process needs to build its replica (pickled to it)."""
    replica: int
    gpu: int | None
    model_path: object
    device: str
    settings: ReplicaSettings
    sampling: object  # SamplingParams
    gpus: tuple | None = None  # the replica's ranks' GPUs (tensor parallel)
    tensor_parallel: int = 1


def _work(w: _Worker, tasks, results) -> None:
    """A worker process: build the replica, then take (line, prompt ids) tasks until a None, sending
    ("done", replica, line, ids) per finished prompt and ("finished", replica, figures) at the end, or
    ("failed", replica, one line) when anything raises."""
    try:
        runs = LineRuns(replica_llm(w.model_path, w.device, w.gpu, w.settings, w.tensor_parallel, w.gpus),
                        w.sampling)
        want = w.settings.inflight(w.device)
        crash_line, _, crash_how = os.environ.get(CRASH_ENV, "-1").partition(":")
        crash_line = int(crash_line)
        no_more = False
        while True:
            while len(runs) < want and not no_more:  # waits only when this replica has nothing to do
                try:
                    task = tasks.get(block=not len(runs), timeout=1.0 if not len(runs) else None)
                except queue.Empty:
                    if not len(runs) and not mp.parent_process().is_alive():
                        return  # the parent is gone (killed, or its MPI job aborted): nobody to feed us
                    if len(runs):
                        break
                    continue
                if task is None:
                    no_more = True
                    break
                runs.add(*task)
            if not len(runs):
                break
            for line, ids in runs.step():
                results.put(("done", w.replica, line, ids))
                if line == crash_line and crash_how == "raise":
                    raise RuntimeError(f"{CRASH_ENV}: line {line}")
                if line == crash_line:
                    results.close()
                    results.join_thread()  # what was sent reaches the parent first
                    os._exit(3)
        results.put(("finished", w.replica, runs.figures()))
    except BaseException as e:  # noqa: BLE001 (Ctrl-C too: the parent says what stopped)
        results.put(("failed", w.replica, one_line(e)))


def replica_llm(model_path, device: str, gpu: int | None, settings: ReplicaSettings, tensor_parallel: int = 1,
                gpus: tuple | None = None, tp_peers=None):
    """The LLM one replica or rank runs, on `gpu` (made current first: its weights, cache and kernels go
    there) or on the CPU reference; with tensor_parallel > 1 split over that many ranks (processes),
    on `gpus` on a GPU (gpus[0] == gpu); tp_peers: ranks 1.. already running (an MPI group)."""
    if gpu is not None:
        import cupy

        cupy.cuda.Device(gpu).use()
    from ..llm import LLM

    s = settings
    return LLM(model_path, device, tokenizer=s.tokenizer, progress=False, max_seqs=s.max_seqs,
               memory_limit=s.memory_limit, tensor_parallel=tensor_parallel, gpus=gpus, tp_peers=tp_peers,
               kernels=s.kernels, kv_cache_dtype=s.kv_cache_dtype, prefill_tokens=s.prefill_tokens,
               swap_space=s.swap_space, dense_experts=s.dense_experts)


class LineRuns:
    """The prompts one replica or rank has in flight, by input line (each its sampler's sequence, so the
    tokens do not depend on which replica runs it), and the replica's figures."""

    def __init__(self, llm, sampling):
        self.llm, self.engine, self.sampling = llm, llm.engine, sampling
        self.line_of: dict[int, int] = {}  # request id -> input line
        self.tokens: dict[int, list[int]] = {}  # request id -> its tokens so far
        self.sent = self.generated = 0
        self.busy = 0.0  # seconds in engine steps

    def __len__(self) -> int:
        return len(self.line_of)

    def add(self, line: int, ids) -> None:
        rid = self.engine.add_request(ids, self.sampling, sequence=line)
        self.line_of[rid], self.tokens[rid] = line, []

    def step(self) -> list:
        """One engine step; the (input line, ids) of each prompt it finished."""
        t0 = time.perf_counter()
        step = self.engine.step()
        self.busy += time.perf_counter() - t0
        finished = []
        for rid, tok, done in zip(step.request_id.tolist(), step.token.tolist(), step.done.tolist()):
            if tok >= 0:
                self.tokens[rid].append(tok)
                self.generated += 1
            if done:
                finished.append((self.line_of.pop(rid), self.tokens.pop(rid)))
        self.sent += len(finished)
        return finished

    def figures(self) -> dict:
        peak = getattr(self.llm.runner, "peak_memory_bytes", lambda: None)()
        return {"backend": self.llm.device, "prompts": self.sent, "generated_tokens": self.generated,
                "seconds": self.busy, "peak_gpu_memory_bytes": peak, "engine": dict(self.engine.stats)}


class LocalEngine:
    """One replica in this process, as a unit a driver feeds: free() slots, add(tasks), advance(give)
    (one engine step; give(line, ids) per finished prompt), end(), done, figures()."""

    def __init__(self, llm, sampling, want: int, gpus: tuple | None = None):
        self.runs, self.want, self.gpus = LineRuns(llm, sampling), want, gpus

    def free(self) -> int:
        return self.want - len(self.runs)

    def in_flight(self) -> int:
        return len(self.runs)

    def add(self, tasks) -> None:
        for line, ids in tasks:
            self.runs.add(line, ids)

    def advance(self, give) -> None:
        if len(self.runs):
            for line, ids in self.runs.step():
                give(line, ids)

    def end(self) -> None:
        pass

    @property
    def done(self) -> bool:
        return not len(self.runs)

    def figures(self) -> list[dict]:
        return [dict(self.runs.figures(), replica=0, gpus=self.gpus)]

    def close(self) -> None:
        close = getattr(self.runs.llm.runner, "close", None)
        if close is not None:  # a tensor-parallel runner: stop its other ranks
            close()


class ReplicaPool:
    """`count` replicas (dp's, default dp.replicas) in worker processes fed through one task queue, as a
    unit a driver feeds (LocalEngine's methods): add() puts (line, ids) tasks on the queue (each worker
    takes one while it has a free slot), end() tells the workers no more will come, advance(give) takes
    what the workers sent for up to `wait` seconds and raises ReplicaError for a worker that failed or
    died (after giving every finished prompt still in the pipe)."""

    def __init__(self, model_path, dp: DataParallelOptions, sampling, count: int | None = None,
                 wait: float = 0.2):
        self.dp, self.wait = dp, wait
        count = dp.replicas if count is None else count
        ctx = mp.get_context("spawn")  # a fresh interpreter each: no CUDA context or lock inherited by fork
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        # a replica split over ranks starts their processes: only a non-daemonic process may have children
        self.workers = [ctx.Process(target=_work, daemon=dp.tensor_parallel == 1, name=f"gptoss-{dp.name(r)}",
                                    args=(_Worker(r, dp.gpu_of(r), model_path, dp.device, dp.settings, sampling,
                                                  dp.gpus_of(r), dp.tensor_parallel), self.tasks, self.results))
                        for r in range(count)]
        want = dp.settings.inflight(dp.device)
        self.capacity, self.queued = want * count, 0  # queued: tasks given and not finished yet
        self.finished: dict[int, dict] = {}
        for w in self.workers:
            w.start()

    def free(self) -> int:
        return self.capacity - self.queued

    def in_flight(self) -> int:
        return self.queued

    def add(self, tasks) -> None:
        for task in tasks:
            self.tasks.put(task)
            self.queued += 1

    def end(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.workers)

    def advance(self, give) -> None:
        try:
            self._take(self.results.get(timeout=self.wait), give)
            return
        except queue.Empty:
            pass
        dead = [r for r, w in enumerate(self.workers) if r not in self.finished and w.exitcode is not None]
        if dead:
            try:  # its last words may still be in the pipe
                self._take(self.results.get(timeout=0.5), give)
                return
            except queue.Empty:
                self._drain(give)
            who = self.dp.name(dead[0])
            what = f"stopped (exit status {self.workers[dead[0]].exitcode}) before finishing its prompts"
            raise ReplicaError(f"{who} {what}", who, what)

    def _take(self, message, give) -> None:
        kind, replica, *rest = message
        if kind == "done":
            self.queued -= 1
            give(*rest)
        elif kind == "finished":
            self.finished[replica] = rest[0]
        else:
            self._drain(give)
            who, what = self.dp.name(replica), f"failed: {rest[0]}"
            raise ReplicaError(f"{who} {what}", who, what)

    def _drain(self, give) -> None:  # what the others already finished is given too
        while True:
            try:
                message = self.results.get(timeout=0.05)
            except queue.Empty:
                return
            if message[0] == "done":
                self._take(message, give)

    def figures(self) -> list[dict]:
        return [dict(self.finished[r], replica=r, gpus=self.dp.gpus_of(r)) for r in range(len(self.workers))]

    def close(self) -> None:
        self.tasks.cancel_join_thread()  # prompts no replica took are dropped, not flushed into a pipe at exit
        for w in self.workers:
            if w.is_alive():
                w.terminate()
        for w in self.workers:
            w.join()


def replica_record(f: dict, wall: float) -> dict:
    """One replica's entry of the --json record, from its figures (LocalEngine/ReplicaPool.figures)."""
    gpus = f["gpus"]
    return {"replica": f["replica"], "gpu": gpus[0] if gpus else None, "gpus": gpus, "backend": f["backend"],
            "prompts": f["prompts"], "generated_tokens": f["generated_tokens"],
            "busy_seconds": round(f["seconds"], 3),
            "tokens_per_second": round(f["generated_tokens"] / wall, 2) if wall > 0 else 0.0,
            "peak_gpu_memory_bytes": f["peak_gpu_memory_bytes"], "engine": f["engine"]}


def run_getp_parallel(model_path, options, dp: DataParallelOptions, sampling) -> int:
    """getp (gptoss.getp.run_getp's files, output and record) over dp.replicas engine replicas in worker
    processes (fewer when fewer prompts are left to run). GetpError for bad input, ReplicaError when a
    replica fails."""
    from ..getp import finish_getp, plan_getp
    from ..progress import GetpProgress
    from ..tokenizer import tokenizer_from_option
    from ..weights import open_weights

    cfg = open_weights(model_path).config
    local = model_path if isinstance(model_path, Path) else None
    plan = plan_getp(cfg, model_path, lambda: tokenizer_from_option(options.tokenizer, local), options, sampling,
                     dp.settings.kv_cache_dtype)
    started = min(dp.replicas, len(plan.todo))  # no more workers than prompts to run
    start = time.perf_counter()
    n = len(plan.prompts)
    pool = None
    try:
        with GetpProgress(total=n, done=n - len(plan.todo), quiet=options.quiet) as bar:
            def finished(line, ids) -> None:
                plan.outputs[line] = ids
                plan.partial.add(line, ids)
                bar.tokens(len(ids))
                bar.prompt_done()

            pool = ReplicaPool(model_path, dp, sampling, started)
            pool.add((line, plan.prompts[line])
                     for line in sorted(plan.todo, key=lambda n: -len(plan.prompts[n])))  # longest first
            pool.end()
            while not pool.done:
                pool.advance(finished)
    finally:
        plan.partial.close()
        if pool is not None:
            pool.close()
    wall = time.perf_counter() - start
    replicas = [replica_record(f, wall) for f in pool.figures()]
    peaks = [r["peak_gpu_memory_bytes"] for r in replicas if r["peak_gpu_memory_bytes"]]
    record = {"generated_tokens": sum(r["generated_tokens"] for r in replicas), "wall_seconds": wall,
              "backend": f"{replicas[0]['backend'] if replicas else dp.device} x{started}", "model": str(model_path),
              "steps": sampling.max_tokens, "batch": dp.settings.max_seqs, "data_parallel": started,
              "tensor_parallel": dp.tensor_parallel,
              "replicas": replicas}
    finish_getp(plan, options, record, max(peaks) if peaks else None)
    return 0
