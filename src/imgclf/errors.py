"""The one exception type a user sees: a one-line message that names the file and what to do."""


class ImgclfError(Exception):
    """Bad input or a failed step that the user can fix. The CLI prints ``error: <message>`` and exits 2."""
