"""Errors that name the argument at fault, as Python users and command-line users know it."""


class ArgumentError(ValueError):
    """A bad value of the argument ``argument`` (a Python name, e.g. ``batch_size``).

    ``str(e)`` names the Python argument; the command line shows ``e.named(flag)`` with
    its option instead (``--batch-size``)."""

    def __init__(self, argument: str, message: str):
        self.argument, self.message = argument, message
        super().__init__(f"{argument} {message}")

    def named(self, name: str) -> str:
        return f"{name} {self.message}"
