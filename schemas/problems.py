"""What validation found wrong in a table: shared by schemas/validate.py and schemas/trees.py's tree checks."""
from __future__ import annotations

from schemas.errors import InputError

MAX_PROBLEMS = 5


class Problems:
    """The problems found in one table, first ones first; raised as one InputError naming the first place."""

    def __init__(self, file: str | None):
        self.file, self.items = file, []

    def add(self, row: int | None, column: str | None, msg: str) -> None:
        self.items.append((row, column, msg))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        row, column, msg = self.items[0]
        more = ""
        if len(self.items) > 1:
            rest = "; ".join(f"row {r}, column '{c}': {m}" for r, c, m in self.items[1:MAX_PROBLEMS])
            more = f" (also: {rest}{'; ...' if len(self.items) > MAX_PROBLEMS else ''})"
        raise InputError(msg + more, file=self.file, row=row, column=column)

    def full(self) -> bool:
        return len(self.items) > MAX_PROBLEMS
