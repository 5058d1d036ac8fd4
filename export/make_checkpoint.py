#!/usr/bin/env python3
"""Write a random gpt-oss checkpoint in the exact Hugging Face layout (config.json + safetensors shards),
for any size from the tiny test models to the full gpt-oss-20b / gpt-oss-120b shapes.

The weights are random but well scaled (activations stay O(1) through the layers, logits are not flat),
and the same for the same --seed. Loaders, the reference, the GPU model and transformers all read it.

  python export/make_checkpoint.py --preset tiny --out models/tiny
  python export/make_checkpoint.py --preset gpt-oss-20b --experts mxfp4 --out models/random-20b
  python export/make_checkpoint.py --config my/config.json --experts bf16 --seed 3 --out models/mine
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

from gptoss.cli import INTERRUPTED, error  # noqa: E402
from gptoss.config import PRESETS, ModelConfig  # noqa: E402

PROG = "make_checkpoint.py"

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 2GB, 500MiB, 1000000)")
    try:
        n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 2GB, 500MiB, 1000000)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return n


def read_config_file(path: Path) -> ModelConfig:
    """A Hugging Face config.json, an original/config.json, or ModelConfig.to_dict() JSON."""
    from gptoss.weights import config_from_dict

    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and "num_layers" in raw:  # gptoss's own field names
        return ModelConfig.from_dict(raw)
    return config_from_dict(raw, str(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS),
                     help="model shape: tiny / tiny-real-heads / tiny-chat (tests), gpt-oss-20b (about 13 GB "
                          "with MXFP4 experts), gpt-oss-120b (about 65 GB)")
    src.add_argument("--config", type=Path, metavar="CONFIG_JSON",
                     help="model shape from a config.json (Hugging Face, original/, or gptoss ModelConfig keys)")
    p.add_argument("--experts", choices=("mxfp4", "bf16"), default="mxfp4",
                   help="expert weights packed as MXFP4 (as openai/gpt-oss-* ships them) or dequantized bf16 "
                        "(about 4x larger) (default mxfp4)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same weights "
                                                       "(default 0)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write into (created, with its missing parents)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="most bytes per safetensors shard, e.g. 2GB or 500MiB; one file when the model fits "
                        "(default 5GB, as Hugging Face)")
    p.add_argument("--force", action="store_true",
                   help="write into DIR even if it already holds a checkpoint (its config.json, "
                        "model*.safetensors and synthetic.json are replaced; other files stay); without "
                        "it, the same checkpoint already there is kept and another one is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptoss.progress import ByteProgress
    from gptoss.weights import CheckpointError, hf_layout, holds_checkpoint, nbytes_of, write_hf_checkpoint

    try:
        cfg = PRESETS[args.preset] if args.preset else read_config_file(args.config)
        layout, _ = hf_layout(cfg, args.experts)
        size = sum(nbytes_of(spec.dtypes[0], spec.shape) for spec in layout.values())
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"{args.out} is a file, not a directory")
        if not args.force and holds_checkpoint(args.out, cfg, args.experts, args.seed, args.shard_size):
            if not args.quiet:
                print(f"{args.out} already holds this checkpoint (same shape, {args.experts} experts, seed "
                      f"{args.seed}); left as it is (--force writes it again)")
            return 0
        if (args.out / "config.json").exists() and not args.force:
            raise ValueError(f"{args.out} already holds another checkpoint; pass --force to replace it")
        source = args.config / "config.json" if args.config and args.config.is_dir() else args.config
        if source and source.resolve() == (args.out / "config.json").resolve():
            raise ValueError(f"{source} is the config.json this would replace; copy it elsewhere first")
        existing = args.out if args.out.exists() else next(p for p in args.out.parents if p.exists())
        free = shutil.disk_usage(existing).free
        if size > free:
            raise ValueError(f"{existing}: {free / 2**30:.1f} GiB free, the checkpoint needs {size / 2**30:.1f} GiB")
        with ByteProgress("write", size, quiet=args.quiet or not sys.stdout.isatty()) as bar:
            write_hf_checkpoint(cfg, args.out, args.experts, args.seed, max_shard_bytes=args.shard_size,
                                on_bytes=bar.advance)
    except (ValueError, CheckpointError, OSError) as e:
        return error(PROG, str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the directory holds an incomplete checkpoint", file=sys.stderr)
        return INTERRUPTED
    if not args.quiet:
        files = sorted(p.name for p in args.out.glob("model*.safetensors"))
        print(f"wrote {args.out} ({size / 2**30:.2f} GiB in {len(files)} file{'s' * (len(files) > 1)}): "
              f"{cfg.num_layers} layers, {cfg.num_experts} experts ({args.experts}), hidden {cfg.hidden_size}, "
              f"vocabulary {cfg.vocab_size}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
