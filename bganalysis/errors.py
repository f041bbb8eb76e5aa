"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a setting).

    The CLI prints the message as one line on stderr and exits with status 2, so the
    message must name the value, the rule it breaks, and the fix.
    """
