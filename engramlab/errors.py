"""The one exception type users see.

Every check of user input (files, specs, flags) raises ``EngramError`` with a single line that
names the offending file or entry and says how to fix it. The CLI prints that line and exits 2
instead of showing a traceback.
"""


class EngramError(Exception):
    """A user-facing error: one line, names the file/entry, says what to do."""

    def __init__(self, message: str):
        # Keep it to one line whatever the caller passed (file contents can carry newlines).
        super().__init__(" ".join(str(message).split()))
