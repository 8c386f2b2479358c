"""`python -m tune_bir.sweep`: see tune_bir/sweep/driver.py; a chosen or sequential `--confirm` is confirmation's.

This module is the command line's composition root: the one module of tune_bir.sweep that may import the
`confirmation` package above it (docs/architecture.md "Layers").
"""

from __future__ import annotations

import sys

from tune_bir.cli import run_main
from tune_bir.sweep import driver
from tune_bir.sweep.plan import PROG, build_parser


def main(argv: list[str] | None = None) -> int:
    """Today's sweep and top-K --confirm (driver.main), or a chosen/sequential confirmation (confirmation.main)."""
    from confirmation.cli import is_chosen_confirmation

    args, _ = build_parser().parse_known_args(argv)
    if is_chosen_confirmation(args):
        import confirmation
        from tune_bir.cpu import quiet_waits

        quiet_waits()   # before torch loads OpenMP (tune_bir.cpu)
        return confirmation.main(argv)
    return driver.main(argv)


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
