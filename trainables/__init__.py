"""Ray Tune adapters of the tune_bir engine (docs/architecture.md "Trainables")."""

from trainables.bir import BIRTrainable

__all__ = ["BIRTrainable"]
