"""The one exception type users see: a one-line message naming the file, tensor or flag, and the fix.

CLIs catch it and print `error: <message>` with exit status 2; nothing else is caught that way.
"""


class MixpertError(Exception):
    """An error the user can act on. Its message is one line and names what to fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
