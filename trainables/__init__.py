"""Ray Tune adapters of the tune_bir engine (DESIGN.md "The sweep")."""

from trainables.bir import BIRTrainable

__all__ = ["BIRTrainable"]
