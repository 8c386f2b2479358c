"""tune_bir: brain-inspired replay (BI-R) + SI with memory exaggeration."""

__version__ = "0.1.0"
