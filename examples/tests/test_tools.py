"""The tools on their own: plain unit tests, no model, no platform needed."""

from __future__ import annotations

import pytest

from agent import CalculatorError, calculator, evaluate, find_fact, lookup


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("37 * 43 + 12", 1603),
        ("(2 + 3) ** 2", 25),
        ("2 ^ 10", 1024),
        ("7 / 2", 3.5),
        ("-4 + 1,000", 996),
        ("17 // 5 + 17 % 5", 5),
        ("6 \u00d7 7 \u00f7 2", 21),
    ],
)
def test_evaluate(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "abs(-1)", "x + 1", "2 ** 100000", "", "1 +"],
)
def test_evaluate_refuses(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_calculator_tool_returns_text() -> None:
    assert calculator.invoke({"expression": "6 * 7"}) == "42"
    assert calculator.invoke({"expression": "10 / 4"}) == "2.5"
    assert calculator.invoke({"expression": "1 / 0"}) == "error: division by zero"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("France", "The capital of France is Paris. The population of France is about 68,400,000."),
        ("capital of Japan", "The capital of Japan is Tokyo."),
        ("Kenya population", "The population of Kenya is about 52,400,000."),
    ],
)
def test_find_fact(topic: str, expected: str) -> None:
    assert find_fact(topic) == expected


def test_lookup_unknown_topic_lists_known_ones() -> None:
    answer = lookup.invoke({"topic": "Atlantis"})
    assert answer.startswith("no facts about 'Atlantis'")
    assert "France" in answer


def test_tool_schemas_are_what_the_model_sees() -> None:
    assert calculator.name == "calculator"
    assert list(calculator.args) == ["expression"]
    assert lookup.name == "lookup"
    assert list(lookup.args) == ["topic"]
