"""tune_bir: brain-inspired replay (BI-R) + SI with memory exaggeration."""

import sys as _sys

from tune_bir import cpu as _cpu

__version__ = "0.1.0"

# `python -m tune_bir.<command>` (or another package's command line that imports this one): Python imports this
# package while it locates the module (sys.argv[0] is "-m" until then), before the command's own imports load
# torch (its config class is built from the plugins, which import torch). So the one place where a command line
# can still set OpenMP's wait policy is here (tune_bir.cpu says why it matters); an import as a library sets nothing.
if _sys.argv[:1] == ["-m"]:
    _cpu.quiet_waits()
