"""Errors that the command lines turn into one-line messages (exit code 2)."""


class TuneBirError(Exception):
    """Base class of the errors a user can fix (bad flags, missing files, missing data)."""


class ConfigError(TuneBirError, ValueError):
    """A configuration value, or a combination of them, is invalid."""


class DataUnavailableError(TuneBirError):
    """A data set is missing locally and cannot be downloaded."""


class ServiceUnreachableError(TuneBirError):
    """A service a run or sweep needs (Ray cluster, MLflow server, storage) cannot be reached or used."""
