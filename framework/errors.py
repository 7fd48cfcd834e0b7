"""Errors caused by what a user wrote (a config, a data file, a hyperparameter).

The CLI prints these as a single line and exits non-zero, without a stack trace; everything
else is a bug and keeps its traceback.
"""

from collections.abc import Iterable
from typing import Any


class UserInputError(ValueError):
    """A bad config value, hyperparameter or input; the message names what is wrong."""


class DataFileError(UserInputError):
    """A data file or directory that is missing or not in the expected format."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming the key and the allowed values."""
    allowed = list(allowed)
    if value not in allowed:
        raise UserInputError(f"{name}={value!r} is not allowed; choose one of {allowed}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Refuse a non-positive (or negative, with ``allow_zero``) number, naming the key."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserInputError(f"{name}={value!r} must be {bound}")
