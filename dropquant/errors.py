"""The one exception type the stages turn into a clear message and a non-zero exit."""


class DropquantError(Exception):
    """A problem the user can fix: a bad parameter, a missing file, an unsupported model."""
