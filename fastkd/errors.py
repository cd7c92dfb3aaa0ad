"""The one exception type for mistakes a user can fix: bad flags, files, classes, configs."""


class FastKDError(Exception):
    """A user-fixable error. The message names the file, flag or class at fault.

    `fastkd.cli.main` prints it without a traceback and exits with status 2.
    """
