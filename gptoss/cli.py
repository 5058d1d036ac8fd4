"""The exit statuses every command uses (README, "Exit status"), and the guard around each main().

  0   success
  1   the command ran and its check failed (evaluation/eval.py: a score under its threshold;
      tools/compile_kernels.py: a kernel that does not compile)
  2   bad usage or input: the command says why in one line, "PROG: error: ..."
  130 interrupted (Ctrl-C)
"""
from __future__ import annotations

import sys

OK = 0
CHECK_FAILED = 1
USAGE = 2  # also argparse's status for a bad command line
INTERRUPTED = 130


def error(prog: str, message: str) -> int:
    """Print `PROG: error: message` on stderr; returns USAGE, the status to exit with."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE


def run_main(prog: str, main, argv=None, interrupted: str = "interrupted") -> int:
    """main(argv)'s status; Ctrl-C prints `PROG: <interrupted>` and gives INTERRUPTED."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}", file=sys.stderr)
        return INTERRUPTED
