"""Errors a user can act on: each message names the problem and the fix."""


class EigenGuardError(Exception):
    """Base class for the project's own errors."""


class DatasetNotFoundError(EigenGuardError, FileNotFoundError):
    """A data set's files are not where the loader looked."""


class CorruptDataError(EigenGuardError, ValueError):
    """A data file exists but cannot be read as its format says."""


class StoreNotFoundError(EigenGuardError, FileNotFoundError):
    """A command that reads results was pointed at a result store that does not exist."""


class MissingStatisticsError(EigenGuardError, RuntimeError):
    """A layer is asked for statistics it never collected."""


class UnknownNameError(EigenGuardError, KeyError):
    """A model, attack, defense or data set name is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
