"""The agent's tools: a safe calculator and a small built-in fact table.

Both are plain functions wrapped with LangChain's `@tool`, so their names, descriptions and
argument schemas are what the model sees. Neither raises on bad input: a tool that fails
returns a short error text, which goes back to the model as the tool result (a model can read
"error: division by zero" and recover; it cannot read a Python traceback).
"""

from __future__ import annotations

import ast
import math
import operator
import re

from langchain_core.tools import tool

# ------------------------------------------------------------------------------ calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1000  # 10 ** 10 ** 10 would keep the CPU busy for a very long time
_MAX_LENGTH = 200


class CalculatorError(ValueError):
    """An expression the calculator does not accept."""


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** (or ^), parentheses.

    Parsed with `ast`, never `eval`: names, calls, attributes and everything else are refused.
    """
    text = expression.strip().replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,234 -> 1234
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > _MAX_LENGTH:
        raise CalculatorError(f"expression longer than {_MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise CalculatorError(f"exponent larger than {_MAX_EXPONENT}")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    raise CalculatorError(f"unsupported element: {ast.dump(node)[:40]}")


def format_number(value: int | float) -> str:
    """`42`, `0.5`, `3.333333333` (floats that are whole numbers lose their `.0`)."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Use it for any arithmetic. Supports numbers, + - * / // % ** and parentheses,
    for example "(12 + 30) * 7" or "2 ** 10".
    """
    try:
        return format_number(evaluate(expression))
    except CalculatorError as error:
        return f"error: {error}"


# ------------------------------------------------------------------------------ lookup

FACTS: dict[str, dict[str, str]] = {
    "france": {"name": "France", "capital": "Paris", "population": "68,400,000"},
    "germany": {"name": "Germany", "capital": "Berlin", "population": "84,500,000"},
    "japan": {"name": "Japan", "capital": "Tokyo", "population": "124,000,000"},
    "brazil": {"name": "Brazil", "capital": "Brasília", "population": "203,000,000"},
    "canada": {"name": "Canada", "capital": "Ottawa", "population": "40,100,000"},
    "australia": {"name": "Australia", "capital": "Canberra", "population": "26,600,000"},
    "kenya": {"name": "Kenya", "capital": "Nairobi", "population": "52,400,000"},
    "italy": {"name": "Italy", "capital": "Rome", "population": "58,900,000"},
}
"""Country facts (2023-2024 estimates, rounded). Keys are lower-case country names."""


def find_fact(topic: str) -> str | None:
    """The fact sentence for a topic such as "France", "capital of Japan", "Kenya population"."""
    words = set(re.findall(r"[a-zà-ÿ]+", topic.lower()))
    for key, fact in FACTS.items():
        if key in words:
            name = fact["name"]
            capital = f"The capital of {name} is {fact['capital']}."
            population = f"The population of {name} is about {fact['population']}."
            wants_capital = bool(words & {"capital", "city"})
            wants_population = bool(words & {"population", "people", "inhabitants", "many"})
            if wants_capital and not wants_population:
                return capital
            if wants_population and not wants_capital:
                return population
            return f"{capital} {population}"
    return None


@tool
def lookup(topic: str) -> str:
    """Look up facts about a country: its capital and population.

    Pass the country name, optionally with what you want to know, for example "France" or
    "population of Japan".
    """
    found = find_fact(topic)
    if found is None:
        known = ", ".join(fact["name"] for fact in FACTS.values())
        return f"no facts about {topic!r}; known countries: {known}"
    return found


TOOLS = [calculator, lookup]
"""Every tool the agent offers the model."""
