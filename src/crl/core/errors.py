"""The one exception type for bad user input: the CLI prints it on one line and exits 2."""


class CRLError(ValueError):
    """Bad input (unknown name, wrong shape, corrupt file, impossible split, NaN loss...)."""
