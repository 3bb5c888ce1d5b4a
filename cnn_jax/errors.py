"""The two kinds of failure: bad input, which the user can fix, and everything else, a bug.

`cnn-jax` prints a UserError as one line and exits with code 2; any other exception is a bug
in cnn-jax or a library and stays visible: exit code 1, with its traceback. UserError is a
ValueError, so Python callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input (an option, a data folder or file, a checkpoint, a run folder); the message
    says what is wrong and what to do."""
