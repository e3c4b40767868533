"""The session guard: the last local check before each LLM call of an agent."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast, overload

from tripwire.agents.killswitch import AsyncKillSwitch, KillSwitch, session_killed
from tripwire.errors import ConfigError, SessionKilled
from tripwire.schemas.events import KillCommand
from tripwire.schemas.textcode import SKETCH_SIZE
from tripwire.streams import loops
from tripwire.streams.embedder import TextEmbedder
from tripwire.streams.policy import MAX_OUTPUT_WINDOW, Policy
from tripwire.streams.state import OUTPUT_KIND_TEXT, SessionState

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_DEFAULTS = Policy()


@functools.cache
def _shared_embedder() -> TextEmbedder:
    """Return the process's embedder; it keeps no per-session state."""
    return TextEmbedder()


class SessionGuard:
    """Stop one agent session from inside its loop, before each LLM call.

    ``before_llm_call`` raises ``SessionKilled`` when the kill switch holds a
    command for the session or its user, or when the call would go over the
    local step budget. ``after_llm_call`` compares the output with the
    session's recent outputs using the detector's own embedder and loop
    signal, and raises when the session repeats itself. Once stopped, a guard
    stays stopped. Output text is embedded and forgotten; only vectors and
    word hashes are kept.

    A guard belongs to one session; ``async with guard:`` also registers the
    current task with an asyncio kill switch, so a kill command interrupts an
    LLM call in progress and the block raises ``SessionKilled``.

    Args:
        session_id: the session the agent is running.
        user_id: the session's user, so user-scoped kills apply.
        max_steps: LLM calls allowed; the next one raises. None for no limit.
        kill_switch: where kill commands from the detector are read.
        loop_threshold: cosine at or above which two outputs count as the
            same; None turns the local loop check off.
        loop_min_matches: how many recent outputs the newest must match.
        loop_window: how many recent outputs it is compared with.
        agent_name: the agent's name, shown in log lines.

    Raises:
        ConfigError: a setting is out of range.
    """

    def __init__(
        self,
        session_id: str,
        *,
        user_id: str | None = None,
        max_steps: int | None = _DEFAULTS.step_budget,
        kill_switch: KillSwitch | AsyncKillSwitch | None = None,
        loop_threshold: float | None = _DEFAULTS.loop_similarity_text,
        loop_min_matches: int = _DEFAULTS.loop_similar_min,
        loop_window: int = _DEFAULTS.loop_similar_window,
        agent_name: str | None = None,
    ) -> None:
        if not session_id:
            raise ConfigError(
                f"session_id must be a non-empty id, got {session_id!r}; pass the "
                "id your spans carry as session.id"
            )

        if max_steps is not None and max_steps < 1:
            raise ConfigError(
                f"max_steps must be >= 1 or None, got {max_steps!r}; None turns "
                "the local step budget off"
            )

        if loop_threshold is not None and not 0 < loop_threshold <= 1:
            raise ConfigError(
                f"loop_threshold must be in (0, 1] or None, got {loop_threshold!r}; "
                f"the detector's default is {_DEFAULTS.loop_similarity_text}"
            )

        if not 1 <= loop_min_matches <= loop_window <= MAX_OUTPUT_WINDOW:
            raise ConfigError(
                f"need 1 <= loop_min_matches <= loop_window <= {MAX_OUTPUT_WINDOW}, "
                f"got loop_min_matches={loop_min_matches!r}, "
                f"loop_window={loop_window!r}"
            )

        self.session_id = session_id
        self.user_id = user_id
        self.agent_name = agent_name
        self.max_steps = max_steps
        self.kill_switch = kill_switch
        self._policy: Policy | None = None
        if loop_threshold is not None:
            self._policy = Policy(
                loop_similarity_text=loop_threshold,
                loop_similar_min=loop_min_matches,
                loop_similar_window=loop_window,
            )
        self._state = SessionState()
        self._lock = threading.Lock()
        self._steps = 0
        self._killed: SessionKilled | None = None
        self._unregister: Callable[[], None] | None = None

    @property
    def steps(self) -> int:
        """LLM calls let through so far."""
        return self._steps

    @property
    def killed(self) -> SessionKilled | None:
        """The exception that stopped the session, or None while it runs."""
        return self._killed

    def before_llm_call(self) -> None:
        """Check the kill switch and the step budget, then count the call.

        With an ``AsyncKillSwitch``, this sync form sees the commands its
        subscriptions received; ``abefore_llm_call`` also reads Redis.

        Raises:
            SessionKilled: the session or its user was killed, or the call
                would exceed ``max_steps``.
        """
        self._raise_if_stopped()

        switch = self.kill_switch
        command: KillCommand | None = None
        if isinstance(switch, KillSwitch):
            command = switch.check(self.session_id, self.user_id)
        elif isinstance(switch, AsyncKillSwitch):
            command = switch.check_local(self.session_id, self.user_id)
        self._admit(command)

    async def abefore_llm_call(self) -> None:
        """Check the kill switch and the step budget, then count the call.

        Raises:
            SessionKilled: as ``before_llm_call``.
        """
        self._raise_if_stopped()

        switch = self.kill_switch
        command: KillCommand | None = None
        if isinstance(switch, KillSwitch):
            command = switch.check(self.session_id, self.user_id)
        elif isinstance(switch, AsyncKillSwitch):
            command = await switch.check(self.session_id, self.user_id)
        self._admit(command)

    def after_llm_call(self, output_text: str | None = None) -> None:
        """Compare the call's output with the session's recent outputs.

        The text is embedded and dropped; the session keeps its vector and
        a few word hashes.

        Args:
            output_text: the completion text; None or empty skips the check.

        Raises:
            SessionKilled: the output repeats enough recent outputs.
        """
        self._raise_if_stopped()
        policy = self._policy
        if policy is None or not output_text:
            return

        code = _shared_embedder().encode(output_text, SKETCH_SIZE)
        if code is None:
            return
        with self._lock:
            trip = loops.similar_outputs(
                self._state, policy, OUTPUT_KIND_TEXT, code.vector, code.sketch
            )
            loops.add_output(
                self._state,
                OUTPUT_KIND_TEXT,
                code.vector,
                code.sketch,
                policy.loop_similar_window,
            )
        if trip is not None:
            self._stop(trip.rule, f"{trip.detail}, after {self._steps} LLM calls")

    def wrap(
        self,
        func: Callable[P, R],
        *,
        output_text: Callable[[Any], str | None] | None = None,
    ) -> Callable[P, R]:
        """Guard every call of ``func``, a function making one LLM call.

        Before each call the guard runs ``before_llm_call`` (or its async
        form for a coroutine function); after it, ``after_llm_call`` with
        the result when it is a string, or with ``output_text(result)``.

        Args:
            func: the function to guard, sync or async.
            output_text: reads the completion text out of the result.

        Returns:
            The guarded function.
        """
        read = output_text or _text_of

        if inspect.iscoroutinefunction(func):
            async_func = cast(Callable[P, Awaitable[Any]], func)

            @functools.wraps(func)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                await self.abefore_llm_call()
                result = await async_func(*args, **kwargs)
                self.after_llm_call(read(result))
                return result

            return cast(Callable[P, R], guarded_async)

        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            self.before_llm_call()
            result = func(*args, **kwargs)
            self.after_llm_call(read(result))
            return result

        return guarded

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...

    @overload
    def __call__(
        self, *, output_text: Callable[[Any], str | None]
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def __call__(
        self,
        func: Callable[P, R] | None = None,
        *,
        output_text: Callable[[Any], str | None] | None = None,
    ) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Use the guard as a decorator: ``@guard`` or ``@guard(output_text=f)``."""
        if func is None:
            return functools.partial(self.wrap, output_text=output_text)
        return self.wrap(func, output_text=output_text)

    def __enter__(self) -> SessionGuard:
        self._raise_if_stopped()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def __aenter__(self) -> SessionGuard:
        self._raise_if_stopped()
        task = asyncio.current_task()
        switch = self.kill_switch
        if task is not None and switch is not None:
            self._unregister = switch.register(
                self.session_id, task, user_id=self.user_id
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if not isinstance(exc, asyncio.CancelledError) or self.kill_switch is None:
            return

        # A kill command cancels the registered task; turn that cancellation
        # into the SessionKilled the agent expects, and leave any other
        # cancellation (a shutdown, a timeout) alone.
        command = self._local_command()
        task = asyncio.current_task()
        if command is None or task is None:
            return
        task.uncancel()
        raise self._record_kill(command) from None

    def _local_command(self) -> KillCommand | None:
        switch = self.kill_switch
        if isinstance(switch, AsyncKillSwitch):
            return switch.check_local(self.session_id, self.user_id)
        if isinstance(switch, KillSwitch):
            return switch.check(self.session_id, self.user_id)
        return None

    def _admit(self, command: KillCommand | None) -> None:
        """Count the call, or raise for a kill command or an exhausted budget."""
        if command is not None:
            raise self._record_kill(command)

        with self._lock:
            over = self.max_steps is not None and self._steps >= self.max_steps
            if not over:
                self._steps += 1
        if over:
            self._stop(
                "step_budget",
                f"LLM call {self._steps + 1} would exceed the local step budget of "
                f"{self.max_steps}",
            )

    def _record_kill(self, command: KillCommand) -> SessionKilled:
        """Remember a kill command as the reason the session stopped."""
        error = session_killed(self.session_id, command)
        if self._killed is None:
            self._killed = error
            logger.info(
                "session %s of agent %s stopped by kill command %s (%s)",
                self.session_id,
                self.agent_name or "?",
                command.command_id,
                command.reason,
            )
        return error

    def _stop(self, reason: str, detail: str) -> None:
        """Stop the session on a local rule."""
        error = SessionKilled(self.session_id, reason, detail)
        self._killed = error
        logger.info(
            "session %s of agent %s stopped by its local guard: %s",
            self.session_id,
            self.agent_name or "?",
            reason,
        )
        raise error

    def _raise_if_stopped(self) -> None:
        """Raise again, as a fresh exception, once the session is stopped."""
        killed = self._killed
        if killed is not None:
            raise SessionKilled(killed.session_id, killed.reason, killed.detail)


def _text_of(result: object) -> str | None:
    """Return the result itself when it is the completion text."""
    return result if isinstance(result, str) else None
