#!/usr/bin/env python3
"""Write tokenizer.bin: o200k_harmony (the gpt-oss tokenizer) in one small file that loads offline.

Put it next to the model file (or inside the model directory) and run.py / decode.py find it there.
The format is described in gptoss/tokenizer.py.

  python export/export_tokenizer_bin.py -o tokenizer.bin
  python export/export_tokenizer_bin.py --vocab o200k_base.tiktoken -o models/tokenizer.bin
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptoss.cli import error, run_main  # noqa: E402

PROG = "export_tokenizer_bin.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="tokenizer.bin",
                   help="where to write (default: tokenizer.bin); its folder must exist")
    p.add_argument("--force", action="store_true", help="replace an existing OUTPUT (never the --vocab file)")
    p.add_argument("--vocab", default=None,
                   help="o200k_base.tiktoken or an existing tokenizer.bin to read (default: $GPTOSS_TOKENIZER, "
                        "else the copy shipped in gptoss/data)")
    args = p.parse_args(argv)

    from gptoss.outputs import OutputPathError, check_output_path
    from gptoss.tokenizer import TokenizerError, get_tokenizer, load_tokenizer, read_tokenizer_bin, \
        write_tokenizer_bin

    out = Path(args.output)
    try:
        if out.is_dir():
            raise TokenizerError(f"{out} is a directory; give the file name, e.g. {out / 'tokenizer.bin'}")
        check_output_path(out, inputs=[args.vocab], force=args.force)
        tok = load_tokenizer(args.vocab) if args.vocab else get_tokenizer()
        check_output_path(out, inputs=[tok.source], force=args.force)  # the vocabulary found, if it is OUTPUT
        write_tokenizer_bin(tok.vocabulary, out)
        if read_tokenizer_bin(out) != tok.vocabulary:
            raise TokenizerError(f"{out}: reading the file back gave a different vocabulary; the disk may be "
                                 "faulty, try again")
    except (TokenizerError, OutputPathError, OSError) as e:
        return error(PROG, str(e))
    v = tok.vocabulary
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {v.name}, {len(v.tokens)} ranked tokens, "
          f"{len(v.specials)} specials, from {tok.source}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
