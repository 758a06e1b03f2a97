"""Errors about datasets as distributed (before `prepare`); `PreparedDataError` covers what comes after."""
from tactic.errors import TacticError


class DatasetError(TacticError):
    """A dataset is missing, laid out otherwise than distributed, or has an unreadable image (strict mode)."""
