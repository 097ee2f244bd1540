"""Protocol errors: every problem found, each naming the step and field by its path."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A protocol that cannot be accepted; ``errors`` lists every problem found.

    Each problem is ``{"loc": "steps[1].current_a", "msg": "..."}`` — the API returns the
    list as-is with status 422, so a technician sees every mistake at once, not one per
    attempt.
    """

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        lines = "; ".join(f"{e['loc'] or '<document>'}: {e['msg']}" for e in errors)
        super().__init__(f"{len(errors)} problem(s) in protocol: {lines}")


class _Problems:
    """Collects problems so one pass reports all of them instead of stopping at the first."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, loc: str, msg: str) -> None:
        self.items.append({"loc": loc, "msg": msg})

    def raise_if_any(self) -> None:
        if self.items:
            raise ProtocolError(self.items)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field

