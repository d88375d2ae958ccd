class UsageError(Exception):
    """A user mistake; the message says what to do next."""


class StoreError(UsageError):
    """A store that is missing, busy, or in a format this code cannot read."""


class StoreDamaged(StoreError):
    """A committed run's array file is missing, truncated or unreadable (see store/check.py)."""
