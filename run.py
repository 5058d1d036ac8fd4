#!/usr/bin/env python3
"""gpt-oss inference: generate, chat, or batch generation over a prompt file (getp).

  python run.py model.bin -m generate -p "Once upon a time"
  python run.py model.bin -m chat
  python run.py model.bin -m getp -i prompts.txt -o out.txt
  python run.py model.bin -m serve --port 8000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptoss.cli import INTERRUPTED, error, run_main  # noqa: E402
from gptoss.engine.config import EngineConfig  # noqa: E402
from gptoss.kernels import KERNEL_MODES  # noqa: E402
from gptoss.ops.attention import KV_DTYPES  # noqa: E402

PROG = "run.py"
MODES = ("generate", "chat", "getp", "serve")
SERVE_SLOTS = 1024  # serve: sequences at once unless -b says (vLLM's max_num_seqs on a GPU of 70 GiB or more)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run gpt-oss-20b / gpt-oss-120b (or a synthetic model of any size) on the GPU, "
                    "or on the CPU with the NumPy reference.",
        epilog="MODEL is a .bin file (export/export_model_bin.py) or a Hugging Face checkpoint directory.\n"
               "Left out, it is $GPTOSS_MODEL, else ./model.bin, else a Hugging Face cache copy of "
               "openai/gpt-oss-20b.\n\nexamples:\n"
               "  python run.py model.bin -m generate -p \"Why is the sky blue?\" -n 128\n"
               "  python run.py model.bin -m chat -y \"Answer in one sentence.\"\n"
               "  python run.py model.bin -m getp -i prompts.txt -o out.txt -n 512\n"
               "  python run.py model.bin -m serve --port 8000\n"
               "  python decode.py -i out.txt -o out.txt.decoded\n\n"
               "exit status: 0 success, 2 bad usage or input (one line: run.py: error: ...), 130 "
               "interrupted (chat: Ctrl-C stops a reply; Ctrl-C at the prompt ends the chat)")
    p.add_argument("model", nargs="?", help="model .bin file or Hugging Face checkpoint directory")
    p.add_argument("-m", "--mode", choices=MODES, default="generate",
                   help="generate: continue a prompt; chat: interactive harmony chat; "
                        "getp: one generation per line of an input file; serve: an OpenAI-compatible "
                        "HTTP server (default: generate)")
    p.add_argument("-p", "--prompt", default=None,
                   help="generate: the prompt, used as written (no chat template); "
                        "chat: a first user message (then the chat goes on interactively)")
    p.add_argument("-n", "--steps", type=int, default=256,
                   help="most tokens to generate per prompt (default 256); generation also ends at "
                        "a stop token (<|return|>, <|call|>, <|endoftext|>) or the context's end")
    p.add_argument("-t", "--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy (default: 1.0 for generate/chat, "
                        "0 for getp)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample among the most likely tokens holding this much "
                        "probability (default 1.0 = all)")
    p.add_argument("-s", "--seed", type=int, default=0,
                   help="random seed; a prompt's draws depend only on (seed, its line, the step), "
                        "so results do not depend on the batch (default 0)")
    p.add_argument("-y", "--system", default=None,
                   help="chat/getp (chat input): instructions, sent as harmony's developer message")
    p.add_argument("-r", "--reasoning", choices=("low", "medium", "high"), default="medium",
                   help="chat/getp (chat input): reasoning effort written into the system message "
                        "(default medium)")
    p.add_argument("-b", "--batch", type=int, default=None,
                   help="getp: most sequences in flight at once (default: as many as GPU memory "
                        "holds; 1 on the CPU); serve: sequences at once, sharing the KV pages (default "
                        f"{SERVE_SLOTS}, fewer when GPU memory cannot hold that many of 2,048 positions)")
    p.add_argument("--prefill-tokens", type=int, default=EngineConfig.prefill_tokens, metavar="N",
                   help="most prompt tokens one step prefills, over all sequences (default "
                        "%(default)s); one prompt may take all of them, so a larger N prefills "
                        "a long prompt in fewer, longer steps (faster to its first token, while the other "
                        "sequences' next tokens wait longer)")
    p.add_argument("--swap-space", type=float, default=EngineConfig.swap_space, metavar="GIB",
                   help="host memory for the KV of sequences preempted when the KV cache runs out of "
                        "pages (default %(default)s GiB, at most half of what is available): they are "
                        "copied there and back instead of prefilled again; 0 prefills them again")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="GPU memory this run may use in all, weights included, in GiB (default: all "
                        "that is free); lower it to share the GPU or to size a run for a smaller one "
                        "(getp --data-parallel: per replica)")
    p.add_argument("-i", "--input", help="getp: input file, one prompt per line (UTF-8)")
    p.add_argument("-o", "--output", help="getp: output file, one line of generated token ids per "
                   "prompt, in input order (written atomically at the end; an existing file needs "
                   "--force)")
    p.add_argument("--input-format", choices=("chat", "text", "ids"), default="chat",
                   help="getp: chat = each line is a user message in the harmony chat format "
                        "(default); text = each line is tokenized as written; ids = each line holds "
                        "space-separated token ids (any vocabulary)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="never stop at a stop token: generate exactly -n tokens (for benchmarks)")
    p.add_argument("--skip-long", action="store_true",
                   help="getp: a prompt that does not fit in the context gets an empty output line "
                        "and a warning, instead of refusing the whole run")
    p.add_argument("--skip-blank", action="store_true",
                   help="getp: a blank prompt line gets an empty output line, instead of refusing "
                        "the whole run; the count is reported at the end")
    p.add_argument("--resume", action="store_true",
                   help="getp: continue an interrupted run from OUTPUT.partial, without "
                        "recomputing finished prompts")
    p.add_argument("--force", action="store_true",
                   help="getp: replace an existing OUTPUT or --json file, and start over instead of "
                        "refusing an OUTPUT.partial left by an interrupted run (files the run reads "
                        "are never replaced)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="getp: also write the run's figures (prompts, tokens, time, tokens/s, peak "
                        "GPU memory) as JSON to this path (an existing file needs --force)")
    p.add_argument("--data-parallel", type=int, default=None, metavar="N",
                   help="getp: N engine replicas, each in its own process with its own weights and KV "
                        "cache, fed longest prompt first from one queue; output identical to one "
                        "replica (default: one per GPU of --gpus; 1 on the CPU); under MPI, per rank (docs/notes/parallel.md)")
    p.add_argument("--tensor-parallel", "--expert-parallel", dest="tensor_parallel", type=int, default=1,
                   metavar="N",
                   help="split one model over N GPUs (query/kv heads and experts; one process each, "
                        "NCCL between them); with more GPUs, data parallel over groups of N: --gpus 0-7 "
                        "--tensor-parallel 2 = 4 replicas of 2 GPUs. N must divide the GPUs, the heads, "
                        "the kv heads and the experts. On the CPU: N processes of the sharded reference "
                        "(default 1)")
    p.add_argument("--kernels", choices=KERNEL_MODES, default=None,
                   help="GPU kernels: auto = the fastest paths this GPU has (tensor cores: mma.sync, wgmma, "
                        "TMA on H100/H200); portable = every kernel's portable path, the code an AMD GPU "
                        "runs, on any GPU (slower; for checking it and measuring its speed). Default: "
                        "$GPTOSS_KERNELS, else auto. An AMD GPU always runs the portable paths")
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="bf16",
                   help="the KV cache's element format: bf16 (default), or fp8 = OCP e4m3 with scale 1: half "
                        "the cache's bytes, so about twice the sequences fit, for K and V rounded to 3 mantissa "
                        "bits (on the H200 its decode attention measured 2.4x slower and its argmax agreement "
                        "4.3 points lower on test models: docs/notes/attention.md, \"FP8 KV cache\"). On the "
                        "CPU reference: K and V rounded alike")
    p.add_argument("--dense-experts", action="store_true",
                   help="keep a bf16 copy of the MXFP4 expert weights beside them for large steps: faster "
                        "prefill and large batches, for 4x the expert memory (20b: +36 GiB; 120b does not fit "
                        "one GPU). Needs the wgmma kernels (H100/H200; not --kernels portable, AMD or "
                        "GPTOSS_WGMMA=0)")
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="getp: the GPUs to run on, e.g. 0,2,3 or 0-3 (default: every visible GPU); "
                        "replica r runs on the r-th GPU of the list, round robin")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto = the GPU when CuPy can use one, else the CPU reference (default auto); "
                        "one line on stderr says which runs, and why not the GPU")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.bin or o200k_base.tiktoken, or a folder holding one (default: "
                        "$GPTOSS_TOKENIZER, else one next to the model, else the copy shipped in gptoss/data)")
    p.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="serve: the port (default 8000)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="serve: the longest sequence served, prompt and new tokens (default: the model's "
                        "context)")
    p.add_argument("--api-key", default=None,
                   help="serve: require `Authorization: Bearer KEY` on /v1/ and /metrics (default: "
                        "$GPTOSS_API_KEY; unset: no key)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="serve: the model's name in /v1/models and the names a request's `model` may give "
                        "(default: the model's file or folder name, also accepted as given on the command line)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (the device line, warnings and errors still print)")
    return p


def getp_gpus(args, device: str) -> tuple:
    """The GPUs of a getp run: --gpus, else every visible GPU; () on the CPU."""
    from gptoss.parallel.data import parse_gpus, visible_gpus

    if device != "gpu":
        if args.gpus:
            fail("--gpus needs the GPU (this run is on the CPU reference)")
        return ()
    visible = visible_gpus()
    if args.gpus is None:
        return visible
    try:
        gpus = parse_gpus(args.gpus)
    except ValueError as e:
        fail(str(e))
    missing = [g for g in gpus if g not in visible]
    if missing:
        fail(f"--gpus {args.gpus}: there is no GPU {missing[0]} (GPUs visible: {len(visible)})")
    return gpus


def keeping_partial(run, output) -> int:
    """run() (a getp); on Ctrl-C with finished prompts in OUTPUT.partial, say how to continue (exit 130)."""
    from gptoss.getp import partial_path

    try:
        return run()
    except KeyboardInterrupt:
        kept = partial_path(output)
        if not kept.exists():
            raise
        print(f"\n{PROG}: interrupted; the finished prompts are kept in {kept}: continue with the same "
              "command and --resume", file=sys.stderr)
        return INTERRUPTED


def tensor_parallel_gpus(args, gpus: tuple) -> int:
    """The data-parallel replicas of a GPU getp run with --tensor-parallel N: one per N GPUs (Failure
    when N does not divide the GPUs, or --data-parallel asks for more groups than there are)."""
    from gptoss.parallel.mpi_layout import replicas_over

    try:
        return replicas_over(gpus, args.tensor_parallel, args.data_parallel, "the chosen")
    except ValueError as e:
        fail(f"{e}; pick them with --gpus")


def run_parallel_getp(model_path, options, sampling, args, device, gpus, replicas, memory) -> int:
    from gptoss.parallel.data import DataParallelOptions, run_getp_parallel

    dp = DataParallelOptions(replicas=replicas, device=device, gpus=gpus, tensor_parallel=args.tensor_parallel,
                             settings=replica_settings(args, memory))
    print(f"getp: {replicas} replicas ({', '.join(dp.name(r) for r in range(replicas))})", file=sys.stderr)
    return keeping_partial(lambda: run_getp_parallel(model_path, options, dp, sampling), options.output)


def run_mpi_getp(model_path, options, sampling, args, device, gpus, memory) -> int:
    """getp over the ranks of an MPI launch (gptoss/parallel/mpi.py): every rank runs this; rank 0 writes."""
    from gptoss.parallel.data import ReplicaError
    from gptoss.parallel.mpi import MpiOptions, run_getp_mpi

    mo = MpiOptions(device=device, gpus=gpus, tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel,
                    settings=replica_settings(args, memory))
    try:
        return run_getp_mpi(model_path, options, mo, sampling)
    except ReplicaError as e:  # what finished is in OUTPUT.partial; the other ranks may be mid-step
        from mpi4py import MPI

        error(PROG, str(e))
        sys.stderr.flush()
        # the launcher forwards each rank's stderr as it reads it, and MPI_Abort has it kill the job: give it
        # a moment to forward this line first (under load the line was lost without the pause)
        time.sleep(0.5)
        MPI.COMM_WORLD.Abort(2)
        return 2


class Failure(Exception):
    """A one-line error; main prints it as `run.py: error: ...` and exits 2."""


def replica_settings(args, memory):
    """What each engine replica's LLM is built with (data parallel, MPI): --tokenizer, -b, --gpu-memory
    (`memory`, bytes), --kernels, --kv-cache-dtype, --prefill-tokens, --swap-space, --dense-experts."""
    from gptoss.parallel.data import ReplicaSettings

    return ReplicaSettings(tokenizer=args.tokenizer, max_seqs=args.batch, memory_limit=memory,
                           kernels=kernel_options(args), kv_cache_dtype=args.kv_cache_dtype,
                           prefill_tokens=args.prefill_tokens, swap_space=args.swap_space,
                           dense_experts=args.dense_experts)


def kernel_options(args):
    """The KernelOptions of --kernels (GPTOSS_WGMMA still read), or None without the flag: the engine then
    reads GPTOSS_KERNELS / GPTOSS_WGMMA itself (KernelOptions.from_env)."""
    if args.kernels is None:
        return None
    from gptoss.kernels import KernelOptions

    return KernelOptions.from_env(mode=args.kernels)


def fail(message: str):
    raise Failure(message)


def main(argv=None) -> int:
    from gptoss.errors import GptossError

    try:
        return _main(argv)
    except (Failure, GptossError) as e:  # bad input (or a GPU too small), said in one line
        return error(PROG, str(e))


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from gptoss.device import choose_device
    from gptoss.loader import resolve_model_path
    from gptoss.sampling import SamplingParams

    if args.steps < 1:
        fail(f"-n must be at least 1 (got {args.steps})")
    temperature = args.temperature
    if temperature is None:
        temperature = 0.0 if args.mode == "getp" else 1.0
    try:
        sampling = SamplingParams(temperature=temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.steps,
                                  ignore_eos=args.ignore_eos)
    except ValueError as e:
        fail(str(e))
    if args.batch is not None and args.batch < 1:
        fail(f"-b must be at least 1 (got {args.batch})")
    if args.prefill_tokens < 1:
        fail(f"--prefill-tokens must be at least 1 (got {args.prefill_tokens})")
    if not args.swap_space >= 0:
        fail(f"--swap-space must be at least 0 GiB (got {args.swap_space})")
    if args.data_parallel is not None and args.data_parallel < 1:
        fail(f"--data-parallel must be at least 1 (got {args.data_parallel})")
    if args.tensor_parallel < 1:
        fail(f"--tensor-parallel must be at least 1 (got {args.tensor_parallel})")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        fail(f"--gpu-memory must be positive (got {args.gpu_memory})")
    if args.mode == "serve" and not 0 < args.port < 65536:
        fail(f"--port must be in 1..65535 (got {args.port})")
    if args.served_model_name is not None and not all(n.strip() for n in args.served_model_name):
        fail(f"--served-model-name takes non-empty names (got {args.served_model_name!r})")
    if args.served_model_name is not None and len(set(args.served_model_name)) != len(args.served_model_name):
        fail(f"--served-model-name names a model once each (got {args.served_model_name!r})")
    if args.max_model_len is not None and args.max_model_len < 2:
        fail(f"--max-model-len must be at least 2 (got {args.max_model_len})")
    if args.mode != "serve":
        for flag, given in (("--host", args.host != "127.0.0.1"), ("--port", args.port != 8000),
                            ("--api-key", args.api_key), ("--served-model-name", args.served_model_name),
                            ("--max-model-len", args.max_model_len is not None)):
            if given:
                fail(f"{flag} is for -m serve")
    if args.mode != "getp":
        for flag, given in (("-i", args.input), ("-o", args.output), ("--json", args.json_path),
                            ("--resume", args.resume), ("--data-parallel", args.data_parallel),
                            ("--gpus", args.gpus)):
            if given:
                fail(f"{flag} is for -m getp" + ("" if args.mode == "serve" else
                                                 f" ({args.mode} writes to standard output)"))

    try:
        model_path = resolve_model_path(args.model)
    except FileNotFoundError as e:
        fail(str(e))
    if args.tensor_parallel > 1 or args.max_model_len is not None:  # checked against the model before it loads
        from gptoss.parallel.tensor import ShardPlan
        from gptoss.weights import open_weights

        model_config = open_weights(model_path).config
        if args.tensor_parallel > 1:
            try:
                ShardPlan(model_config, args.tensor_parallel)
            except ValueError as e:
                fail(f"--tensor-parallel {args.tensor_parallel}: {e}")
        if (args.max_model_len or 0) > model_config.max_context:
            fail(f"--max-model-len {args.max_model_len} is longer than the model's context "
                 f"({model_config.max_context})")
    if args.mode == "getp":  # every file checked before the model loads
        from gptoss.getp import GetpOptions, check_getp_options

        options = GetpOptions(input=args.input, output=args.output, input_format=args.input_format,
                              reasoning=args.reasoning, system=args.system, tokenizer=args.tokenizer,
                              skip_blank=args.skip_blank, skip_long=args.skip_long, resume=args.resume,
                              force=args.force, json_path=args.json_path, quiet=args.quiet)
        check_getp_options(options, model_path)
    if args.tokenizer is not None:
        from gptoss.tokenizer import tokenizer_from_option

        tokenizer_from_option(args.tokenizer)  # a file that is not a tokenizer is an error now, not later
    device, line = choose_device(args.device)  # (DeviceError: --device gpu without a usable GPU)
    print(line, file=sys.stderr)
    if device == "cpu" and args.kernels == "portable":
        fail("--kernels portable picks the GPU kernels; this run is on the CPU reference, which has none")
    if device == "cpu" and args.tensor_parallel > 1 and args.kv_cache_dtype == "fp8":
        fail("--kv-cache-dtype fp8 with --tensor-parallel runs on GPUs; the sharded CPU reference has no FP8 cache")
    if device == "cpu" and args.dense_experts:
        fail("--dense-experts runs on GPUs (H100/H200); this run is on the CPU reference: drop it")

    memory = None if args.gpu_memory is None else int(args.gpu_memory * 2**30)
    if args.mode == "getp":
        gpus = getp_gpus(args, device)
        from gptoss.parallel.mpi import mpi_world_size

        if mpi_world_size() > 1:  # what each rank runs: gptoss/parallel/mpi_layout.py
            return run_mpi_getp(model_path, options, sampling, args, device, gpus, memory)
        if gpus and args.tensor_parallel > 1:
            replicas = tensor_parallel_gpus(args, gpus)
        else:
            replicas = args.data_parallel or (len(gpus) if gpus else 1)
        if replicas > 1:
            return run_parallel_getp(model_path, options, sampling, args, device, gpus, replicas, memory)
        if gpus and gpus[0] != 0:
            import cupy

            cupy.cuda.Device(gpus[0]).use()
    else:
        gpus = None
        if device == "gpu" and args.tensor_parallel > 1:
            from gptoss.parallel.data import visible_gpus

            gpus = visible_gpus()
            if len(gpus) < args.tensor_parallel:
                fail(f"--tensor-parallel {args.tensor_parallel} needs {args.tensor_parallel} GPUs; "
                     f"{len(gpus)} visible")
    from gptoss.llm import LLM

    try:  # (CheckpointError, ModelTooLargeError: GptossErrors, said in one line by main)
        batch = args.batch or (SERVE_SLOTS if args.mode == "serve" else None)
        # serve admits a request on its prompt's pages (vLLM's way): a chat without max_tokens may run to
        # the context's end, and promising every request that much would leave most slots empty
        extra = {"promise": 0.0} if args.mode == "serve" else {}
        llm = LLM(model_path, device, tokenizer=args.tokenizer, max_seqs=batch, memory_limit=memory,
                  tensor_parallel=args.tensor_parallel,
                  gpus=tuple(gpus[:args.tensor_parallel]) if gpus else None, kernels=kernel_options(args),
                  kv_cache_dtype=args.kv_cache_dtype, prefill_tokens=args.prefill_tokens,
                  swap_space=args.swap_space,
                  dense_experts=args.dense_experts, **extra)
    except ValueError as e:  # an unknown synthetic:PRESET; --dense-experts where no kernel reads the copy
        fail(str(e))

    if args.mode == "getp":
        from gptoss.getp import run_getp

        return keeping_partial(lambda: run_getp(llm, options, sampling), options.output)
    if args.mode == "serve":
        return run_serve(llm, args, model_path)
    from gptoss.interactive import run_chat, run_generate

    if args.mode == "generate":
        return run_generate(llm, args.prompt, sampling)
    from gptoss.harmony import ChatOptions

    return run_chat(llm, ChatOptions(reasoning_effort=args.reasoning, instructions=args.system), sampling,
                    first_message=args.prompt)


def run_serve(llm, args, model_path) -> int:
    """The OpenAI-compatible server until Ctrl-C or SIGTERM (uvicorn finishes, then the engine thread
    aborts what is left)."""
    import os
    import signal

    import uvicorn

    from gptoss.serve import ServeOptions, build_app

    if args.served_model_name:
        name, *aliases = args.served_model_name
    else:  # the file or folder name, and the model as the command line gave it
        name = Path(str(model_path)).name or str(model_path)
        aliases = sorted({args.model, str(model_path)} - {name})
    options = ServeOptions(model_name=name, model_aliases=tuple(aliases),
                           api_key=args.api_key or os.environ.get("GPTOSS_API_KEY") or None,
                           reserve_slots=llm.config.max_seqs, max_model_len=args.max_model_len)
    app = build_app(llm.engine, llm.tokenizer, options)
    print(f"{PROG}: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    # uvicorn raises the signal that stopped it again once it is through: SIGTERM then ends with status 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # SIGTERM or Ctrl-C: uvicorn stops taking connections and lets running requests finish for up to 30 s;
    # the engine thread then aborts what is left
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
