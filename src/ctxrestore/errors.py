"""The one error type users see: a message that says what was wrong and what would be valid."""


class CtxRestoreError(ValueError):
    """Bad input or configuration. The CLI prints the message as one line and exits non-zero."""
