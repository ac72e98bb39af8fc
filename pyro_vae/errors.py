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


class MissingData(FileNotFoundError):
    """Data files that are not where they were looked for. ``str(e)`` says to point the
    Python argument ``data_dir`` at them; the command line shows ``e.named(flag)``
    (``--data-dir``) instead."""

    def __init__(self, template: str):
        self.template = template  # "{argument}" where the argument is named
        super().__init__(template.format(argument="data_dir="))

    def named(self, name: str) -> str:
        return self.template.format(argument=name)
