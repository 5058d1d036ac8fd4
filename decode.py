#!/usr/bin/env python3
"""Turn getp output (one line of token ids per prompt) back into text, one line per prompt.

  python decode.py -i out.txt -o out.txt.decoded
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="getp output: space-separated token ids per line")
    p.add_argument("-o", "--output", default=None, help="where to write the text (default: standard output)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.bin or o200k_base.tiktoken (default: found "
                   "as run.py finds it)")
    p.add_argument("--keep-newlines", action="store_true",
                   help="write newlines inside a generation as they are (default: escape them as \\n "
                        "so that line k of the output is prompt k)")
    args = p.parse_args(argv)

    from gptoss.getp import parse_id_line, write_atomically
    from gptoss.tokenizer import get_tokenizer

    path = Path(args.input)
    if not path.is_file():
        print(f"decode.py: error: {path}: no such file", file=sys.stderr)
        return 2
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        tok = get_tokenizer(args.tokenizer)
        texts = []
        for n, line in enumerate(lines):
            text = tok.decode(parse_id_line(line, n + 1, tok.vocab_size))
            texts.append(text if args.keep_newlines else text.replace("\\", "\\\\").replace("\n", "\\n"))
    except (ValueError, UnicodeDecodeError) as e:
        print(f"decode.py: error: {path}: {e}", file=sys.stderr)
        return 2
    if args.output:
        write_atomically(args.output, texts)
    else:
        sys.stdout.write("".join(t + "\n" for t in texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
