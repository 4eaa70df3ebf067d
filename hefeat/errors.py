"""The one error family users see: each message says what was expected, what came, and the fix."""


class HefeatError(Exception):
    """A user-facing error: bad input, missing data or a failed precondition."""


class NoTissueError(HefeatError):
    """A slide has no detectable tissue (recorded as skipped, never fatal to a batch)."""
