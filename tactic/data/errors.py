"""Errors about datasets as distributed (before `prepare`); `PreparedDataError` covers what comes after."""


class DatasetError(RuntimeError):
    """A dataset is missing, laid out otherwise than distributed, or has an unreadable image (strict mode)."""
