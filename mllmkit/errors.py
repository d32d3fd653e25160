"""User-facing errors: anything a user can fix from the recipe or command line.

The CLI prints these without a traceback and exits with code 2.
"""

from __future__ import annotations

__all__ = ["UserError", "RecipeError", "DataError"]


class UserError(Exception):
    """An error caused by the user's input, with a message that says what to fix."""


class RecipeError(UserError):
    """A recipe value is wrong: says file, key path, what was expected and what was found."""

    def __init__(self, key: str, message: str, file: str | None = None) -> None:
        self.key = key
        self.file = file
        self.detail = message
        super().__init__(self._render())

    def with_file(self, file: str) -> RecipeError:
        return RecipeError(self.key, self.detail, file=self.file or file)

    def _render(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.detail}"


class DataError(UserError):
    """A data record or image cannot be used; carries the file and record index."""
