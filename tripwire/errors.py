"""The exception tree: every Tripwire error derives from TripwireError."""


class TripwireError(Exception):
    """Root of every error Tripwire raises on purpose."""


class ConfigError(TripwireError):
    """A setting is missing, malformed or out of range."""


class SpanValidationError(TripwireError):
    """A span record cannot be decoded or breaks the span contract.

    Args:
        reason: what is wrong, naming the field and the rule it broke.
        field: the offending field's name, when one field is to blame.
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class PricingError(TripwireError):
    """The price book or a price override file is malformed."""


class SessionKilled(TripwireError):
    """Raised inside an agent when its session, or its user, has been killed.

    Args:
        session_id: the session that was stopped.
        reason: the rule that fired, for example ``session_cost_budget``.
        detail: a sentence saying why, with the figures.
    """

    def __init__(self, session_id: str, reason: str, detail: str = "") -> None:
        message = f"session {session_id!r} was killed: {reason}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)
        self.session_id = session_id
        self.reason = reason
        self.detail = detail
