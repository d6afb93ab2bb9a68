"""The exit codes of every command and the error that means "bad input" (exit 2).

Defined here, below every other module, so that the git wrapper, the result reader and the commands share
them without depending on one another.
"""

EXIT_OK = 0  # pass
EXIT_FAIL = 1  # a regression or a failed case (a missing one under --require-all, ...)
EXIT_BAD_INPUT = 2  # bad input, usage, or an error inside the gate: never a verdict on the code measured


class InputError(Exception):
    """An input that cannot be used (a file, an option, a git ref); the message says what is wrong and how
    to fix it."""
