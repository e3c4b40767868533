"""Detection policy: rule thresholds and actions, per agent, from env or TOML."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tripwire.errors import ConfigError
from tripwire.schemas.events import Action

logger = logging.getLogger(__name__)

ENV_PREFIX = "TRIPWIRE_"
POLICY_FILE_ENV = "TRIPWIRE_POLICY_FILE"

# Every rule the core knows, in a fixed order: a rule's index is its bit in
# the "already fired" masks that session and user-day states keep.
RULES: tuple[str, ...] = (
    "step_budget",
    "tool_call_budget",
    "token_budget",
    "session_cost_budget",
    "burn_rate",
    "recursion_depth",
    "tool_error_rate",
    "loop_similarity",
    "loop_repeat_tool",
    "loop_tool_cycle",
    "unknown_model",
    "user_daily_tokens",
    "user_daily_cost",
)
RULE_BIT: dict[str, int] = {rule: 1 << index for index, rule in enumerate(RULES)}

DEFAULT_ACTIONS: dict[str, Action] = {
    "step_budget": Action.KILL,
    "tool_call_budget": Action.KILL,
    "token_budget": Action.KILL,
    "session_cost_budget": Action.KILL,
    "burn_rate": Action.KILL,
    "recursion_depth": Action.KILL,
    "tool_error_rate": Action.ALERT,
    "loop_similarity": Action.KILL,
    "loop_repeat_tool": Action.KILL,
    "loop_tool_cycle": Action.ALERT,
    "unknown_model": Action.ALERT,
    "user_daily_tokens": Action.KILL,
    "user_daily_cost": Action.KILL,
}

# Capacities of the bounded windows a session state keeps; the policy may
# look at less of them, never more.
MAX_TOOL_WINDOW = 16
MAX_OUTPUT_WINDOW = 8
MAX_ERROR_WINDOW = 64
MAX_BURN_BUCKETS = 60
_OFF = "off"


@dataclass(frozen=True, slots=True)
class RulePolicy:
    """What one rule does when it fires: kill or alert, or nothing if disabled."""

    action: Action
    enabled: bool = True


def _default_rules() -> dict[str, RulePolicy]:
    return {rule: RulePolicy(action) for rule, action in DEFAULT_ACTIONS.items()}


@dataclass(frozen=True, slots=True)
class _Spec:
    label: str
    kind: type
    minimum: float
    inclusive: bool
    maximum: float | None = None

    def describe(self) -> str:
        low = f">= {self.minimum:g}" if self.inclusive else f"> {self.minimum:g}"
        if self.maximum is None:
            return low
        return f"{low} and <= {self.maximum:g}"


_SPECS: dict[str, _Spec] = {
    "step_budget": _Spec("step budget", int, 1, True),
    "tool_call_budget": _Spec("tool-call budget", int, 1, True),
    "token_budget": _Spec("token budget", int, 1, True),
    "session_budget_usd": _Spec("session budget", float, 0, False),
    "burn_rate_usd": _Spec("burn-rate limit", float, 0, False),
    "burn_rate_window_s": _Spec("burn-rate window", float, 0, False),
    "burn_rate_bucket_s": _Spec("burn-rate bucket", float, 0, False),
    "max_depth": _Spec("maximum recursion depth", int, 0, True),
    "tool_error_min_errors": _Spec("tool-error minimum", int, 1, True),
    "tool_error_rate": _Spec("tool-error rate", float, 0, False, 1.0),
    "tool_error_window": _Spec("tool-error window", int, 1, True, MAX_ERROR_WINDOW),
    "loop_similarity_text": _Spec("text loop similarity", float, 0, False, 1.0),
    "loop_similarity_vector": _Spec("vector loop similarity", float, 0, False, 1.0),
    "loop_similar_min": _Spec("similar-output count", int, 1, True),
    "loop_similar_window": _Spec(
        "similar-output window", int, 1, True, MAX_OUTPUT_WINDOW
    ),
    "loop_repeat_min": _Spec("repeated tool-call count", int, 2, True),
    "loop_repeat_window": _Spec(
        "repeated tool-call window", int, 2, True, MAX_TOOL_WINDOW
    ),
    "loop_cycle_repeats": _Spec("tool-cycle repeats", int, 2, True),
    "loop_cycle_max_period": _Spec("tool-cycle period", int, 2, True),
    "user_daily_tokens": _Spec("user daily token cap", int, 1, True),
    "user_daily_budget_usd": _Spec("user daily budget", float, 0, False),
}


@dataclass(frozen=True, slots=True)
class Policy:
    """Thresholds and actions of every rule, with per-agent overrides.

    Build one with :meth:`from_env`; derive variants with
    :meth:`with_overrides`; look up the policy an agent runs under with
    :meth:`for_agent`. Budgets fire when the figure goes above the threshold;
    loop and tool-error signals fire when their count or score reaches it.
    """

    step_budget: int = 25
    tool_call_budget: int = 50
    token_budget: int = 500_000
    session_budget_usd: float = 2.0
    burn_rate_usd: float = 0.50
    burn_rate_window_s: float = 60.0
    burn_rate_bucket_s: float = 10.0
    max_depth: int = 5
    tool_error_min_errors: int = 5
    tool_error_rate: float = 0.5
    tool_error_window: int = 10
    loop_similarity_text: float = 0.70
    loop_similarity_vector: float = 0.92
    loop_similar_min: int = 3
    loop_similar_window: int = 5
    loop_repeat_min: int = 4
    loop_repeat_window: int = 8
    loop_cycle_repeats: int = 3
    loop_cycle_max_period: int = 4
    user_daily_tokens: int = 5_000_000
    user_daily_budget_usd: float = 50.0
    rules: Mapping[str, RulePolicy] = field(default_factory=_default_rules)
    agents: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    _per_agent: dict[str, Policy] = field(
        default_factory=dict, compare=False, repr=False
    )
    kill_mask: int = field(init=False, compare=False, repr=False, default=0)
    alert_mask: int = field(init=False, compare=False, repr=False, default=0)
    burn_buckets: int = field(init=False, compare=False, repr=False, default=0)

    def __post_init__(self) -> None:
        _check_consistency(self, "policy")
        kill_mask = 0
        alert_mask = 0
        for rule, rule_policy in self.rules.items():
            if not rule_policy.enabled:
                continue
            if rule_policy.action is Action.KILL:
                kill_mask |= RULE_BIT[rule]
            else:
                alert_mask |= RULE_BIT[rule]
        # Frozen, but these are derived from the fields just checked.
        object.__setattr__(self, "kill_mask", kill_mask)
        object.__setattr__(self, "alert_mask", alert_mask)
        buckets = math.ceil(self.burn_rate_window_s / self.burn_rate_bucket_s)
        object.__setattr__(self, "burn_buckets", max(1, buckets))

    def pending(self, killed: int, alerted: int) -> int:
        """Return the bits of the enabled rules that have not fired yet.

        Args:
            killed: bits of the rules that already issued their kill.
            alerted: bits of the rules that already raised their alert.
        """
        return (self.kill_mask & ~killed) | (self.alert_mask & ~alerted)

    def rule(self, name: str) -> RulePolicy:
        """Return the action of one rule.

        Raises:
            KeyError: ``name`` is not one of ``RULES``.
        """
        return self.rules[name]

    def for_agent(self, agent_name: str | None) -> Policy:
        """Return the policy spans of ``agent_name`` are judged by.

        Agents without overrides, and spans without an agent name, get this
        policy itself. The per-agent policies are built and validated once.
        """
        if agent_name is None or not self.agents:
            return self
        cached = self._per_agent.get(agent_name)
        if cached is not None:
            return cached
        if agent_name not in self.agents:
            return self
        policy = self._build_agent(agent_name)
        self._per_agent[agent_name] = policy
        return policy

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] = os.environ,
        toml_path: str | Path | None = None,
    ) -> Policy:
        """Build the policy from ``TRIPWIRE_*`` variables over an optional TOML file.

        Every setting named in :meth:`setting_names` is read from
        ``TRIPWIRE_<NAME>`` (``TRIPWIRE_SESSION_BUDGET_USD``,
        ``TRIPWIRE_BURN_RATE_ACTION``); the environment wins over the file.
        The file is ``toml_path``, else ``TRIPWIRE_POLICY_FILE`` if set.

        Args:
            environ: the environment to read.
            toml_path: a policy TOML file with top-level settings, an
                optional ``[actions]`` table and ``[agents.<name>]`` tables.

        Returns:
            The validated policy, with its per-agent policies built.

        Raises:
            ConfigError: a value is malformed or out of range, a setting or
                rule is unknown, or the file cannot be read; the message names
                the variable or the file and key.
        """
        path = toml_path if toml_path is not None else environ.get(POLICY_FILE_ENV)
        settings: dict[str, Any] = {}
        agents: dict[str, dict[str, Any]] = {}
        if path:
            settings, agents = _read_toml(Path(path))

        for name in setting_names():
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                settings[name] = _parse_setting(name, environ[variable], variable)

        policy = _apply(cls(), settings, "policy", agents)
        logger.debug("policy loaded: %d agent overrides", len(agents))
        return policy

    def with_overrides(self, **settings: Any) -> Policy:
        """Return a copy with some settings replaced.

        Args:
            **settings: setting name to value; strings are parsed as the
                environment's are (``step_budget="10"``,
                ``burn_rate_action="alert"``). Agent overrides still win over
                these for the settings they name.

        Returns:
            The new policy.

        Raises:
            ConfigError: a name is unknown or a value is invalid.
        """
        parsed = {
            name: _parse_setting(name, value, f"--set {name}")
            for name, value in settings.items()
        }
        agents = {name: dict(values) for name, values in self.agents.items()}
        return _apply(self, parsed, "--set", agents)

    def settings(self) -> dict[str, Any]:
        """Return every setting and its current value, actions as strings."""
        values: dict[str, Any] = {name: getattr(self, name) for name in _SPECS}
        for rule in RULES:
            rule_policy = self.rules[rule]
            action = str(rule_policy.action) if rule_policy.enabled else _OFF
            values[f"{rule}_action"] = action
        return values

    def _build_agent(self, agent_name: str) -> Policy:
        overrides = self.agents[agent_name]
        return _replace(self, dict(overrides), f"agents.{agent_name}", agents={})


def setting_names() -> list[str]:
    """Return the names of every setting: thresholds, then ``<rule>_action``."""
    return [*_SPECS, *(f"{rule}_action" for rule in RULES)]


def describe_settings() -> dict[str, str]:
    """Return a one-line description of every setting, for ``--list-settings``."""
    described = {
        name: f"{spec.label}, {spec.kind.__name__} {spec.describe()}"
        for name, spec in _SPECS.items()
    }
    for rule in RULES:
        described[f"{rule}_action"] = f"action of {rule}: kill, alert or off"
    return described


def _apply(
    base: Policy,
    settings: dict[str, Any],
    origin: str,
    agents: dict[str, dict[str, Any]],
) -> Policy:
    policy = _replace(base, settings, origin, agents=agents)
    for agent_name in agents:
        policy._per_agent[agent_name] = policy._build_agent(agent_name)
    return policy


def _replace(
    base: Policy,
    settings: dict[str, Any],
    origin: str,
    *,
    agents: Mapping[str, Mapping[str, Any]],
) -> Policy:
    thresholds = {k: v for k, v in settings.items() if not k.endswith("_action")}
    rules = dict(base.rules)
    for name, value in settings.items():
        if name.endswith("_action"):
            rules[name.removesuffix("_action")] = value
    return dataclasses.replace(
        base, **thresholds, rules=rules, agents=agents, _per_agent={}
    )


def _parse_setting(name: str, value: Any, origin: str) -> Any:
    if name.endswith("_action") and name.removesuffix("_action") in RULE_BIT:
        return _parse_action(value, origin)
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError(
            f"unknown policy setting {name!r} ({origin}); known settings are "
            f"{', '.join(setting_names())}"
        )
    parsed = _parse_number(spec, value, origin)
    _check_range(spec, parsed, origin)
    return parsed


def _parse_action(value: Any, origin: str) -> RulePolicy:
    text = str(value).strip().lower()
    if text == _OFF:
        return RulePolicy(Action.ALERT, enabled=False)
    try:
        return RulePolicy(Action(text))
    except ValueError:
        raise ConfigError(
            f"rule action must be kill, alert or off, got {value!r} ({origin})"
        ) from None


def _parse_number(spec: _Spec, value: Any, origin: str) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{spec.label} must be a number, got {value!r} ({origin})")
    try:
        if spec.kind is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip().replace("_", ""))
            if isinstance(value, int):
                return value
            raise ValueError(value)
        number = float(value)
    except (TypeError, ValueError):
        kind = "whole number" if spec.kind is int else "number"
        raise ConfigError(
            f"{spec.label} must be a {kind}, got {value!r} ({origin})"
        ) from None
    if not math.isfinite(number):
        raise ConfigError(
            f"{spec.label} must be a finite number, got {number!r} ({origin})"
        )
    return number


def _check_range(spec: _Spec, value: float, origin: str) -> None:
    too_low = value < spec.minimum if spec.inclusive else value <= spec.minimum
    too_high = spec.maximum is not None and value > spec.maximum
    if too_low or too_high:
        raise ConfigError(
            f"{spec.label} must be {spec.describe()}, got {value!r} ({origin})"
        )


def _check_consistency(policy: Policy, origin: str) -> None:
    if policy.loop_similar_min > policy.loop_similar_window:
        raise ConfigError(
            f"similar-output count {policy.loop_similar_min} exceeds its window "
            f"{policy.loop_similar_window} ({origin}): lower "
            "TRIPWIRE_LOOP_SIMILAR_MIN or raise TRIPWIRE_LOOP_SIMILAR_WINDOW"
        )
    if policy.loop_repeat_min > policy.loop_repeat_window:
        raise ConfigError(
            f"repeated tool-call count {policy.loop_repeat_min} exceeds its window "
            f"{policy.loop_repeat_window} ({origin}): lower "
            "TRIPWIRE_LOOP_REPEAT_MIN or raise TRIPWIRE_LOOP_REPEAT_WINDOW"
        )
    cycle_span = policy.loop_cycle_repeats * policy.loop_cycle_max_period
    if cycle_span > MAX_TOOL_WINDOW:
        raise ConfigError(
            f"tool-cycle repeats x period must be <= {MAX_TOOL_WINDOW} tool calls, "
            f"got {policy.loop_cycle_repeats} x {policy.loop_cycle_max_period} "
            f"({origin}): lower TRIPWIRE_LOOP_CYCLE_REPEATS or "
            "TRIPWIRE_LOOP_CYCLE_MAX_PERIOD"
        )
    if policy.tool_error_min_errors > policy.tool_error_window:
        raise ConfigError(
            f"tool-error minimum {policy.tool_error_min_errors} exceeds its window "
            f"{policy.tool_error_window} ({origin}): lower "
            "TRIPWIRE_TOOL_ERROR_MIN_ERRORS or raise TRIPWIRE_TOOL_ERROR_WINDOW"
        )
    buckets = math.ceil(policy.burn_rate_window_s / policy.burn_rate_bucket_s)
    if buckets > MAX_BURN_BUCKETS:
        raise ConfigError(
            f"burn-rate window {policy.burn_rate_window_s:g} s holds {buckets} "
            f"buckets of {policy.burn_rate_bucket_s:g} s, more than "
            f"{MAX_BURN_BUCKETS} ({origin}): raise TRIPWIRE_BURN_RATE_BUCKET_S"
        )
    for rule in RULES:
        if rule not in policy.rules:
            raise ConfigError(f"policy has no action for rule {rule!r} ({origin})")


def _read_toml(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read policy file {str(path)!r}: {exc}; fix the path "
            f"({POLICY_FILE_ENV} or --policy)"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"policy file {str(path)!r} is not valid TOML: {exc}"
        ) from exc

    raw_agents = doc.pop("agents", {})
    settings = _table_settings(doc, f"{path}")
    if not isinstance(raw_agents, dict):
        raise ConfigError(f"{path}: 'agents' must be a table of [agents.<name>] tables")
    agents: dict[str, dict[str, Any]] = {}
    for agent_name, table in raw_agents.items():
        where = f"{path}: agents.{agent_name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table of settings")
        agents[agent_name] = _table_settings(dict(table), where)
    return settings, agents


def _table_settings(table: dict[str, Any], where: str) -> dict[str, Any]:
    actions = table.pop("actions", {})
    if not isinstance(actions, dict):
        raise ConfigError(f"{where}: 'actions' must be a table of rule = action")
    settings = {
        name: _parse_setting(name, value, f"{where}.{name}")
        for name, value in table.items()
    }
    for rule, value in actions.items():
        name = f"{rule}_action"
        settings[name] = _parse_setting(name, value, f"{where}.actions.{rule}")
    return settings
