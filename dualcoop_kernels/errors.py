"""What the package raises when what was asked of it is wrong, told apart from its own bugs.

The package raises :class:`UsageError` for a wrong argument, file or setting, with a message that says
what is wrong and what was expected; the ``dualcoop`` command prints it in one line. Anything else that
escapes is a bug in the package, and the command shows its traceback.
"""


class UsageError(ValueError):
    """What was asked is wrong (an argument, a file, a setting); the message says what was expected."""


class UsageTypeError(UsageError, TypeError):
    """A :class:`UsageError` about an argument's type: also a ``TypeError``, as Python's own are."""


class MissingExtra(UsageError, ImportError):
    """A :class:`UsageError` for an optional dependency that is not installed; also an ``ImportError``."""
