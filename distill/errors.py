"""User-facing errors."""


class DistillError(Exception):
    """A user-facing error: one clear line, exit code 2 from the CLI."""
