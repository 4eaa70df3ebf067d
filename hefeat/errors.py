"""The one error family users see: each message says what was expected, what came, and the fix."""


class HefeatError(Exception):
    """A user-facing error: bad input, missing data or a failed precondition.

    `reason_code` is the machine-readable reason recorded next to the message when the error fails
    a slide (see hefeat.store.schema.REASON_CODES).
    """

    reason_code = "error"

    def __init__(self, *args: object, reason_code: str | None = None):
        super().__init__(*args)
        if reason_code:
            self.reason_code = reason_code


class NoTissueError(HefeatError):
    """A slide has no detectable tissue (recorded as skipped, never fatal to a batch)."""

    reason_code = "no_tissue"


class NonFiniteError(HefeatError):
    """An encoder produced NaN or inf for a slide's tiles (the slide fails; the batch goes on)."""

    reason_code = "non_finite"
