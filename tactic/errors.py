"""Failures a user can fix. Each message says what is wrong and where (the param, the path or the
stage to run): stage entry points print it as one line and exit 2. Any other exception is a bug
and keeps its traceback."""


class TacticError(ValueError):
    """Bad input: a params value, a dataset, a file, a stage run out of order."""
