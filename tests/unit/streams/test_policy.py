"""Policy: defaults, environment and TOML parsing, per-agent overrides, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tripwire.errors import ConfigError
from tripwire.schemas.events import Action
from tripwire.streams.policy import (
    RULE_BIT,
    RULES,
    Policy,
    RulePolicy,
    describe_settings,
    setting_names,
)


def test_defaults_match_the_documented_thresholds() -> None:
    policy = Policy.from_env({})

    assert policy.step_budget == 25
    assert policy.tool_call_budget == 50
    assert policy.token_budget == 500_000
    assert policy.session_budget_usd == 2.0
    assert (policy.burn_rate_usd, policy.burn_rate_window_s) == (0.5, 60.0)
    assert policy.max_depth == 5
    assert policy.user_daily_tokens == 5_000_000
    assert policy.user_daily_budget_usd == 50.0
    assert policy.loop_similarity_vector == 0.92
    assert policy.rule("session_cost_budget") == RulePolicy(Action.KILL)
    assert policy.rule("tool_error_rate") == RulePolicy(Action.ALERT)
    assert policy.rule("unknown_model") == RulePolicy(Action.ALERT)
    assert set(policy.rules) == set(RULES)


def test_environment_sets_thresholds_and_actions() -> None:
    policy = Policy.from_env(
        {
            "TRIPWIRE_SESSION_BUDGET_USD": "1.5",
            "TRIPWIRE_STEP_BUDGET": "10",
            "TRIPWIRE_TOKEN_BUDGET": "1_000",
            "TRIPWIRE_BURN_RATE_ACTION": "alert",
            "TRIPWIRE_LOOP_TOOL_CYCLE_ACTION": "KILL",
            "TRIPWIRE_UNKNOWN_MODEL_ACTION": "off",
            "TRIPWIRE_KAFKA_BOOTSTRAP": "ignored:9092",
        }
    )

    assert policy.session_budget_usd == 1.5
    assert policy.step_budget == 10
    assert policy.token_budget == 1000
    assert policy.rule("burn_rate").action is Action.ALERT
    assert policy.rule("loop_tool_cycle").action is Action.KILL
    assert not policy.rule("unknown_model").enabled
    assert not policy.pending(0, 0) & RULE_BIT["unknown_model"]


def test_negative_budget_names_value_rule_and_variable() -> None:
    with pytest.raises(ConfigError) as raised:
        Policy.from_env({"TRIPWIRE_SESSION_BUDGET_USD": "-1"})

    assert str(raised.value) == (
        "session budget must be > 0, got -1.0 (TRIPWIRE_SESSION_BUDGET_USD)"
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "TRIPWIRE_STEP_BUDGET",
            "2.5",
            "step budget must be a whole number, got '2.5'",
        ),
        ("TRIPWIRE_STEP_BUDGET", "0", "step budget must be >= 1, got 0"),
        ("TRIPWIRE_SESSION_BUDGET_USD", "lots", "must be a number, got 'lots'"),
        ("TRIPWIRE_SESSION_BUDGET_USD", "nan", "must be a finite number"),
        ("TRIPWIRE_TOOL_ERROR_RATE", "1.5", "tool-error rate must be > 0 and <= 1"),
        ("TRIPWIRE_LOOP_SIMILAR_WINDOW", "9", "<= 8, got 9"),
        ("TRIPWIRE_BURN_RATE_ACTION", "stop", "must be kill, alert or off, got 'stop'"),
    ],
)
def test_bad_environment_values_are_config_errors(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Policy.from_env({variable: value})

    assert expected in str(raised.value)
    assert variable in str(raised.value)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"TRIPWIRE_LOOP_SIMILAR_MIN": "6"}, "similar-output count 6 exceeds"),
        ({"TRIPWIRE_LOOP_REPEAT_MIN": "9"}, "repeated tool-call count 9 exceeds"),
        ({"TRIPWIRE_LOOP_CYCLE_REPEATS": "5"}, "tool-cycle repeats x period"),
        ({"TRIPWIRE_TOOL_ERROR_MIN_ERRORS": "11"}, "tool-error minimum 11 exceeds"),
        ({"TRIPWIRE_BURN_RATE_BUCKET_S": "0.5"}, "holds 120 buckets"),
    ],
)
def test_inconsistent_settings_are_config_errors(
    environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        Policy.from_env(environ)


def test_toml_file_with_agent_overrides(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        "session_budget_usd = 3.0\n"
        "[actions]\nburn_rate = 'alert'\n"
        "[agents.researcher]\nstep_budget = 60\nsession_budget_usd = 10\n"
        "[agents.researcher.actions]\nloop_similarity = 'off'\n"
        "[agents.triage]\ntool_call_budget = 5\n"
    )

    policy = Policy.from_env({}, toml_path=path)
    researcher = policy.for_agent("researcher")
    triage = policy.for_agent("triage")

    assert policy.session_budget_usd == 3.0
    assert policy.rule("burn_rate").action is Action.ALERT
    assert (researcher.step_budget, researcher.session_budget_usd) == (60, 10.0)
    assert not researcher.rule("loop_similarity").enabled
    assert researcher.rule("burn_rate").action is Action.ALERT
    assert (triage.tool_call_budget, triage.session_budget_usd) == (5, 3.0)
    assert policy.for_agent("someone-else") is policy
    assert policy.for_agent(None) is policy
    assert policy.for_agent("researcher") is researcher


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("step_budget = 40\ntoken_budget = 9000\n")

    policy = Policy.from_env(
        {"TRIPWIRE_POLICY_FILE": str(path), "TRIPWIRE_STEP_BUDGET": "12"}
    )

    assert (policy.step_budget, policy.token_budget) == (12, 9000)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("step_budjet = 3\n", "unknown policy setting 'step_budjet'"),
        ("[agents.bot]\nstep_budget = -2\n", "agents.bot.step_budget"),
        ("[actions]\nsession_cost_budget = 'maybe'\n", "actions.session_cost_budget"),
        ("[actions]\nno_such_rule = 'kill'\n", "unknown policy setting"),
        ("agents = 3\n", "'agents' must be a table"),
        ("step_budget = [\n", "not valid TOML"),
    ],
)
def test_bad_policy_file_names_the_key(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(content)

    with pytest.raises(ConfigError, match=expected):
        Policy.from_env({}, toml_path=path)


def test_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        Policy.from_env({}, toml_path=tmp_path / "absent.toml")


def test_with_overrides_parses_strings_and_keeps_agent_overrides(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[agents.researcher]\nstep_budget = 60\n")
    policy = Policy.from_env({}, toml_path=path)

    changed = policy.with_overrides(
        step_budget="10", session_budget_usd=0.75, burn_rate_action="off"
    )

    assert (changed.step_budget, changed.session_budget_usd) == (10, 0.75)
    assert not changed.rule("burn_rate").enabled
    assert changed.for_agent("researcher").step_budget == 60
    assert changed.for_agent("researcher").session_budget_usd == 0.75
    assert policy.step_budget == 25


def test_with_overrides_rejects_unknown_names_and_bad_values() -> None:
    policy = Policy()

    with pytest.raises(ConfigError, match="unknown policy setting 'budget'"):
        policy.with_overrides(budget="3")
    with pytest.raises(ConfigError, match=r"step budget must be >= 1, got 0 \(--set"):
        policy.with_overrides(step_budget="0")


def test_settings_list_every_threshold_and_action() -> None:
    settings = Policy().settings()

    assert list(settings) == setting_names()
    assert set(describe_settings()) == set(settings)
    assert settings["session_budget_usd"] == 2.0
    assert settings["tool_error_rate_action"] == "alert"
    assert settings["step_budget_action"] == "kill"


def test_pending_masks_follow_actions_and_fired_bits() -> None:
    policy = Policy().with_overrides(step_budget_action="alert")
    step = RULE_BIT["step_budget"]
    cost = RULE_BIT["session_cost_budget"]

    assert policy.pending(0, 0) & step
    assert not policy.pending(0, step) & step
    assert policy.pending(step, 0) & step
    assert not policy.pending(cost, 0) & cost
