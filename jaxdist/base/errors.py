"""The one exception type that the CLI turns into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the person running jaxdist: a config, an experiment name, a data shape.

    The message is one line that names what is wrong and how to fix it. The CLI prints
    it without a traceback and exits with status 2.
    """
