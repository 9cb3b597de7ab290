"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class EebenchError(Exception):
    """An expected mistake in the user's input (bad name, bad file, bad value)."""


class UnknownNameError(EebenchError, ValueError, KeyError):
    """A name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
