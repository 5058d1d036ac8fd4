#!/usr/bin/env python3
"""Turn getp output (one line of token ids per prompt) back into text, one line per prompt.

  python decode.py -i out.txt -o out.txt.decoded
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptoss.cli import error, run_main  # noqa: E402

PROG = "decode.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="getp output: space-separated token ids per line")
    p.add_argument("-o", "--output", default=None,
                   help="where to write the text (default: standard output; an existing file needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing -o file (never the input)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.bin or o200k_base.tiktoken, or a folder "
                   "holding one (default: found as run.py finds it)")
    p.add_argument("--keep-newlines", action="store_true",
                   help="write newlines inside a generation as they are (default: escape them as \\n "
                        "so that line k of the output is prompt k)")
    args = p.parse_args(argv)

    from gptoss.getp import parse_id_line
    from gptoss.outputs import OutputPathError, check_output_path, write_lines
    from gptoss.tokenizer import TokenizerError, tokenizer_from_option

    path = Path(args.input)
    if not path.is_file():
        return error(PROG, f"{path}: no such file")
    try:
        tok = tokenizer_from_option(args.tokenizer)
        if args.output:
            check_output_path(args.output, inputs=[path, args.tokenizer, tok.source], force=args.force)
    except (OutputPathError, TokenizerError) as e:
        return error(PROG, str(e))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        texts = []
        for n, line in enumerate(lines):
            text = tok.decode(parse_id_line(line, n + 1, tok.vocab_size))
            texts.append(text if args.keep_newlines else text.replace("\\", "\\\\").replace("\n", "\\n"))
    except (ValueError, UnicodeDecodeError) as e:
        return error(PROG, f"{path}: {e}")
    if args.output:
        write_lines(args.output, texts)
    else:
        sys.stdout.write("".join(t + "\n" for t in texts))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
