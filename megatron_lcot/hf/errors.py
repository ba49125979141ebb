"""The user-mistake error of checkpoint conversion (tools print it and exit 2)."""


class ConversionError(ValueError):
    """A conversion request that cannot be carried out; the message names the flag/file and the fix."""
