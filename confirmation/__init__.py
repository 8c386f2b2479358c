"""Confirmations chosen beforehand and pre-registered: the plan, the seed ledger, and look after look.

  plan.py    `ConfirmationPlan` (plan.json, its sha256), configs from a hand-written file, the design's options
  ledger.py  `Ledger`: every seed the sweeps and confirmations under one storage path used
  looks.py   `run_looks`: a batch of seeds per look as Ray trials (tune_bir.sweep.batch), verdicts from
             analysis.sequential, decided configs stop
  cli.py     `main`: `python -m tune_bir.sweep --confirm DIR --config-file FILE --sequential ...`

The layer above the analysis (docs/architecture.md "Layers"): it reads verdicts from analysis and asks the
sweep layer to run; neither of them imports it.
"""

from confirmation.cli import main
from confirmation.ledger import Ledger
from confirmation.looks import run_looks
from confirmation.plan import ConfigSpec, ConfirmationPlan, read_config_file

__all__ = ["ConfigSpec", "ConfirmationPlan", "Ledger", "main", "read_config_file", "run_looks"]
