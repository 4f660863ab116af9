"""The one exception type users see: a message saying what is wrong and what to do."""


class ParrotError(Exception):
    """An error the user can cause and fix (bad path, corrupt file, wrong shapes, bad option).

    The CLI prints its message without a traceback and exits non-zero.
    """
