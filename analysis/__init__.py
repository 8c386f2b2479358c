"""Finished sweeps -> tables and rankings (reads what `tune_bir.sweep` wrote)."""
