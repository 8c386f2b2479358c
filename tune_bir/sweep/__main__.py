"""`python -m tune_bir.sweep`: see tune_bir/sweep/driver.py."""

import sys

from tune_bir.cli import run_main
from tune_bir.sweep.driver import main
from tune_bir.sweep.plan import PROG

if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
