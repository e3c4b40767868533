"""Budget, burn-rate, depth and tool-error rules over a session or user-day state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tripwire.streams.policy import MAX_ERROR_WINDOW, RULE_BIT, Policy
from tripwire.streams.state import (
    ID_BYTES,
    LINK_BYTES,
    LINK_CAPACITY,
    NO_PARENT,
    SessionState,
    UserDayState,
    from_nano,
)

logger = logging.getLogger(__name__)

_ERROR_MASK = (1 << MAX_ERROR_WINDOW) - 1
_STEP_BUDGET = RULE_BIT["step_budget"]
_TOOL_CALL_BUDGET = RULE_BIT["tool_call_budget"]
_TOKEN_BUDGET = RULE_BIT["token_budget"]
_SESSION_COST_BUDGET = RULE_BIT["session_cost_budget"]
_BURN_RATE = RULE_BIT["burn_rate"]
_RECURSION_DEPTH = RULE_BIT["recursion_depth"]
_USER_DAILY_TOKENS = RULE_BIT["user_daily_tokens"]
_USER_DAILY_COST = RULE_BIT["user_daily_cost"]


@dataclass(frozen=True, slots=True)
class Trip:
    """A rule's condition holds: which rule, a sentence, and the figures.

    Attributes:
        rule: the rule name, one of ``policy.RULES``; also the kill reason.
        detail: one sentence with the figures, for people.
        evidence: the figures, for machines (JSON-ready scalars and lists).
    """

    rule: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


def step_budget(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when the session made more LLM calls than its step budget."""
    if state.llm_calls <= policy.step_budget:
        return None

    return Trip(
        "step_budget",
        f"{state.llm_calls} LLM calls, over the step budget of {policy.step_budget}",
        {"llm_calls": state.llm_calls, "threshold": policy.step_budget},
    )


def tool_call_budget(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when the session made more tool calls than its tool-call budget."""
    if state.tool_calls <= policy.tool_call_budget:
        return None

    return Trip(
        "tool_call_budget",
        f"{state.tool_calls} tool calls, over the tool-call budget of "
        f"{policy.tool_call_budget}",
        {"tool_calls": state.tool_calls, "threshold": policy.tool_call_budget},
    )


def token_budget(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when the session used more tokens than its token budget."""
    if state.tokens <= policy.token_budget:
        return None

    return Trip(
        "token_budget",
        f"{state.tokens} tokens, over the token budget of {policy.token_budget}",
        {"tokens": state.tokens, "threshold": policy.token_budget},
    )


def session_cost_budget(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when the session's cost went above its budget."""
    cost = state.cost_usd
    if cost <= policy.session_budget_usd:
        return None

    return Trip(
        "session_cost_budget",
        f"session cost ${cost:.4f}, over the budget of "
        f"${policy.session_budget_usd:.2f}",
        {
            "cost_usd": round(cost, 9),
            "threshold_usd": policy.session_budget_usd,
            "unpriced_spans": state.unpriced,
        },
    )


def add_burn(state: SessionState, policy: Policy, end_time: float, nano: int) -> None:
    """Add a span's cost to its event-time bucket; drop buckets out of the window.

    A span whose bucket already left the window (it ended more than a window
    before the latest span) counts in the session total only.
    """
    bucket = int(end_time // policy.burn_rate_bucket_s)
    burn = state.burn
    starts = burn[0::2]
    newest = max(starts) if starts else bucket
    newest = bucket if bucket > newest else newest
    oldest_kept = newest - policy.burn_buckets + 1
    if starts and min(starts) < oldest_kept:
        _evict_burn(state, oldest_kept)
        starts = burn[0::2]
    if bucket < oldest_kept or nano == 0:
        return

    # The bucket, when kept, is never one of those just evicted.
    try:
        burn[2 * starts.index(bucket) + 1] += nano
    except ValueError:
        burn.extend((bucket, nano))


def burn_rate(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when the cost within the sliding event-time window is over the limit.

    The window is the ``ceil(window / bucket)`` most recent buckets, the
    latest one partly filled: it spans between ``window - bucket`` and
    ``window`` seconds of event time.
    """
    window_cost = from_nano(sum(state.burn[1::2]))
    if window_cost <= policy.burn_rate_usd:
        return None

    return Trip(
        "burn_rate",
        f"${window_cost:.4f} spent within {policy.burn_rate_window_s:g} s, over the "
        f"burn-rate limit of ${policy.burn_rate_usd:.2f}",
        {
            "window_cost_usd": round(window_cost, 9),
            "window_s": policy.burn_rate_window_s,
            "bucket_s": policy.burn_rate_bucket_s,
            "threshold_usd": policy.burn_rate_usd,
        },
    )


def recursion_depth(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when nested agent invocations went deeper than allowed."""
    if state.depth <= policy.max_depth:
        return None

    return Trip(
        "recursion_depth",
        f"agent invocations nested {state.depth} deep, over the maximum of "
        f"{policy.max_depth}",
        {"depth": state.depth, "threshold": policy.max_depth},
    )


def session_total_trips(
    state: SessionState, policy: Policy, pending: int
) -> list[Trip]:
    """Return the trips of the rules over session totals, in rule order.

    The rules checked are step, tool-call, token and cost budgets, burn rate
    and recursion depth, those among ``pending`` (bits of ``RULE_BIT``).
    It gives what calling each of them gives; the thresholds are compared
    inline first, so the span that trips nothing, nearly every span, makes
    no rule call.
    """
    if not (
        (pending & _STEP_BUDGET and state.llm_calls > policy.step_budget)
        or (pending & _TOOL_CALL_BUDGET and state.tool_calls > policy.tool_call_budget)
        or (pending & _TOKEN_BUDGET and state.tokens > policy.token_budget)
        or (
            pending & _SESSION_COST_BUDGET
            and from_nano(state.cost_nano) > policy.session_budget_usd
        )
        or (
            pending & _BURN_RATE
            and from_nano(sum(state.burn[1::2])) > policy.burn_rate_usd
        )
        or (pending & _RECURSION_DEPTH and state.depth > policy.max_depth)
    ):
        return []

    found = (
        step_budget(state, policy) if pending & _STEP_BUDGET else None,
        tool_call_budget(state, policy) if pending & _TOOL_CALL_BUDGET else None,
        token_budget(state, policy) if pending & _TOKEN_BUDGET else None,
        session_cost_budget(state, policy) if pending & _SESSION_COST_BUDGET else None,
        burn_rate(state, policy) if pending & _BURN_RATE else None,
        recursion_depth(state, policy) if pending & _RECURSION_DEPTH else None,
    )
    return [trip for trip in found if trip is not None]


def user_day_trips(state: UserDayState, policy: Policy, pending: int) -> list[Trip]:
    """Return the trips of the daily user caps among ``pending``, in rule order.

    Like :func:`session_total_trips`, thresholds are compared inline first.
    """
    if not (
        (pending & _USER_DAILY_TOKENS and state.tokens > policy.user_daily_tokens)
        or (
            pending & _USER_DAILY_COST
            and from_nano(state.cost_nano) > policy.user_daily_budget_usd
        )
    ):
        return []

    found = (
        user_daily_tokens(state, policy) if pending & _USER_DAILY_TOKENS else None,
        user_daily_cost(state, policy) if pending & _USER_DAILY_COST else None,
    )
    return [trip for trip in found if trip is not None]


def add_tool_status(state: SessionState, failed: bool) -> None:
    """Shift one tool call's outcome into the session's error window."""
    state.tool_errors = ((state.tool_errors << 1) | int(failed)) & _ERROR_MASK
    state.tool_window = min(state.tool_window + 1, MAX_ERROR_WINDOW)


def tool_error_rate(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when enough of the recent tool calls failed.

    Both must hold over the last ``tool_error_window`` tool calls: at least
    ``tool_error_min_errors`` failures, and a failure share of at least
    ``tool_error_rate``. Agents that meet silent tool failures by retrying
    in a loop show up here before they show up in the budgets.
    """
    calls = min(state.tool_window, policy.tool_error_window)
    if calls == 0:
        return None
    errors = (state.tool_errors & ((1 << calls) - 1)).bit_count()
    rate = errors / calls
    if errors < policy.tool_error_min_errors or rate < policy.tool_error_rate:
        return None

    return Trip(
        "tool_error_rate",
        f"{errors} of the last {calls} tool calls failed ({rate:.0%}), at or over "
        f"{policy.tool_error_min_errors} failures and {policy.tool_error_rate:.0%}",
        {
            "errors": errors,
            "calls": calls,
            "rate": round(rate, 4),
            "min_errors": policy.tool_error_min_errors,
            "threshold_rate": policy.tool_error_rate,
        },
    )


def link_depth(state: SessionState, key: bytes, parent: bytes, agent: bool) -> int:
    """Record an agent span's link to its parent; return the depth it reveals.

    Spans end (and arrive) children first, so a chain is joined from both
    ends: the heights of already-seen children below, and the agent spans
    already seen above. A non-agent span is kept only when it is the parent
    of a kept span, to bridge an agent invoked from a tool call.

    Args:
        state: the session state; its ``links`` are updated.
        key: the span's dedupe key.
        parent: the parent span's dedupe key, or ``NO_PARENT``.
        agent: whether the span is an agent span.

    Returns:
        The depth (0 for a top-level agent) of the deepest agent span on a
        known chain through this span, or -1 when the span joins no chain.
    """
    links = state.links
    count = len(links) // LINK_BYTES
    below = 0
    is_parent = False
    for index in range(count):
        start = index * LINK_BYTES
        if links[start + ID_BYTES : start + 2 * ID_BYTES] == key:
            is_parent = True
            below = max(below, links[start + 2 * ID_BYTES])
    if not agent and not is_parent:
        return -1

    height = min(below + int(agent), 255)
    above = _raise_ancestors(links, parent, height)

    entry = key + (parent or NO_PARENT) + bytes((height, int(agent)))
    kept = links[LINK_BYTES:] if count >= LINK_CAPACITY else links
    state.links = kept + entry
    return above + height - 1


def _raise_ancestors(links: bytearray, parent: bytes, height: int) -> int:
    """Walk up known ancestors, raising their heights; return agents above."""
    above = 0
    current = parent
    for _ in range(LINK_CAPACITY):
        if current == NO_PARENT:
            break
        start = _find_link(links, current)
        if start < 0:
            break
        is_agent = links[start + 2 * ID_BYTES + 1]
        height = min(height + is_agent, 255)
        links[start + 2 * ID_BYTES] = max(links[start + 2 * ID_BYTES], height)
        above += is_agent
        current = bytes(links[start + ID_BYTES : start + 2 * ID_BYTES])
    return above


def _find_link(links: bytearray, key: bytes) -> int:
    for start in range(0, len(links), LINK_BYTES):
        if links[start : start + ID_BYTES] == key:
            return start
    return -1


def user_daily_tokens(state: UserDayState, policy: Policy) -> Trip | None:
    """Trip when a user's tokens on this UTC day went above the daily cap."""
    if state.tokens <= policy.user_daily_tokens:
        return None

    return Trip(
        "user_daily_tokens",
        f"user used {state.tokens} tokens on {state.day}, over the daily cap of "
        f"{policy.user_daily_tokens}",
        {
            "tokens": state.tokens,
            "day": state.day,
            "threshold": policy.user_daily_tokens,
        },
    )


def user_daily_cost(state: UserDayState, policy: Policy) -> Trip | None:
    """Trip when a user's cost on this UTC day went above the daily budget."""
    cost = state.cost_usd
    if cost <= policy.user_daily_budget_usd:
        return None

    return Trip(
        "user_daily_cost",
        f"user spent ${cost:.4f} on {state.day}, over the daily budget of "
        f"${policy.user_daily_budget_usd:.2f}",
        {
            "cost_usd": round(cost, 9),
            "day": state.day,
            "threshold_usd": policy.user_daily_budget_usd,
        },
    )


def _evict_burn(state: SessionState, oldest_kept: int) -> None:
    burn = state.burn
    index = 0
    while index < len(burn):
        if burn[index] < oldest_kept:
            del burn[index : index + 2]
        else:
            index += 2
