#!/usr/bin/env python3
"""Convert a gpt-oss checkpoint into our single-file .bin (docs/BIN_FORMAT.md): every tensor
4096-byte aligned for mmap and direct GPU upload, MXFP4 experts kept packed.

The source is anything gptoss.weights.open_weights reads: a Hugging Face checkpoint directory
(config.json + model.safetensors or shards with model.safetensors.index.json, MXFP4 or bf16 experts),
OpenAI's original/ folder, or another .bin. Every tensor is checked against config.json first.

  python export/export_model_bin.py --model gpt-oss-20b --output model.bin
  python export/export_model_bin.py --model gpt-oss-120b/original --output gpt-oss-120b.bin
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import shutil  # noqa: E402

from gptoss.cli import INTERRUPTED, error  # noqa: E402

PROG = "export_model_bin.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the checkpoint to convert: a Hugging Face directory, its original/ folder, or a .bin")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="the .bin to write (written as FILE.tmp and renamed when complete)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists (never the source)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptoss.outputs import OutputPathError, check_output_path
    from gptoss.progress import ByteProgress
    from gptoss.weights import BinWeights, CheckpointError, open_weights, write_bin
    from gptoss.weights.binfile import build_header

    out = Path(args.output)
    try:
        if out.is_dir():
            raise CheckpointError(f"{out} is a directory; give a file name, e.g. {out / 'model.bin'}")
        check_output_path(out, inputs=[args.model], force=args.force)
        weights = open_weights(args.model)
        _, table = build_header(weights)
        size = table[-1]["offset"] + table[-1]["nbytes"]
        free = shutil.disk_usage(out.parent).free
        if size > free:
            raise CheckpointError(f"{out.parent}: {_gib(free)} free, the .bin needs {_gib(size)}")
        quiet = args.quiet or not sys.stdout.isatty()
        with ByteProgress("export", sum(t["nbytes"] for t in table), quiet=quiet) as bar:
            write_bin(out, weights, on_bytes=bar.advance)
        BinWeights(out)  # read the header back: a full disk or a bad copy shows here, not at run time
    except (CheckpointError, OutputPathError, OSError) as e:
        return error(PROG, str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED
    if not args.quiet:
        cfg = weights.config
        print(f"wrote {out} ({_gib(out.stat().st_size)}): {cfg.num_layers} layers, {cfg.num_experts} experts "
              f"({weights.experts_format}), hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
