"""The stub's deterministic OpenAI replies, pure (no sockets, no clock).

A reply is, in order of precedence: a rule from a TOML script file, a call of the tool that
`tool_choice` forces, a JSON document sampled from the requested `response_format` schema, or an
echo of the last message. Tokens are counted as words. Bodies and stream events have the shapes
of vLLM's (and OpenAI's) chat completions.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The `created` timestamp of every object the stub returns: fixed, so answers are reproducible.
CREATED = 1_700_000_000

_RULE_KEYS = ("match", "role", "reply", "tool_call")
_TOOL_CALL_KEYS = ("name", "arguments")
_ROLES = ("user", "tool")
# `{0}`, `{1}`, `{name}` (named group) and `{last}`; any other brace is literal text, so a reply
# may contain JSON.
_FIELD = re.compile(r"\{(\d+|[A-Za-z_]\w*)\}")
_ANYTHING = re.compile(r".*", re.DOTALL)


# -- script rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One script rule: when the last message matches, answer `reply` or call a tool."""

    pattern: re.Pattern[str] | None
    role: str = "user"
    reply: str | None = None
    tool_name: str | None = None
    tool_arguments: dict[str, Any] = field(default_factory=dict)

    def match(self, role: str, content: str) -> re.Match[str] | None:
        """The match object when the rule applies to a last message, else `None`."""
        if role != self.role:
            return None
        if self.pattern is None:
            return _ANYTHING.match(content)
        return self.pattern.search(content)


def load_script(path: str | os.PathLike[str]) -> list[Rule]:
    """Read and validate a TOML rules file; raise `ValueError` with a one-line message.

    The file holds `[[rules]]` tables, tried in order, first match wins::

        [[rules]]
        match = "weather in (\\\\w+)"  # regex searched case-insensitively; omitted: anything
        role = "user"                # role of the last message: "user" (default) or "tool"
        reply = "Sunny in {1}."      # {0}, {1}.. groups, {name} named groups, {last} content
        # or: tool_call = { name = "get_weather", arguments = { city = "{1}" } }

    A `tool_call` rule only fires when the request offers tools (and `tool_choice` is not
    "none"): a model cannot call a tool it was not given.
    """
    # tomllib is 3.11+; on 3.10 the `tomli` backport (a declared dependency there) has the same
    # API. Imported by name so mypy is clean whether or not the backport is installed.
    tomllib: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")

    where = f"stub script {os.fspath(path)!s}"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: invalid TOML: {' '.join(str(exc).split())}") from None

    unknown = sorted(set(data) - {"rules"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected only [[rules]])")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ValueError(f"{where}: 'rules' must be an array of tables ([[rules]])")
    return [_parse_rule(raw, f"{where}: rule {n}") for n, raw in enumerate(raw_rules, start=1)]


def _parse_rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a table")
    _check_keys(raw, _RULE_KEYS, where, "")
    pattern: re.Pattern[str] | None = None
    if "match" in raw:
        if not isinstance(raw["match"], str):
            raise ValueError(f"{where}: 'match' must be a string (a regular expression)")
        try:
            pattern = re.compile(raw["match"], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"{where}: bad regex {raw['match']!r}: {exc}") from None
    role = raw.get("role", "user")
    if role not in _ROLES:
        raise ValueError(f"{where}: 'role' must be one of {', '.join(_ROLES)}, got {role!r}")
    has_reply, has_tool = "reply" in raw, "tool_call" in raw
    if has_reply == has_tool:
        problem = "both 'reply' and 'tool_call'" if has_reply else "neither 'reply' nor 'tool_call'"
        raise ValueError(f"{where}: has {problem}; give exactly one")
    groups = pattern.groups if pattern is not None else 0
    if has_reply:
        if not isinstance(raw["reply"], str):
            raise ValueError(f"{where}: 'reply' must be a string")
        _check_fields(raw["reply"], groups, where)
        return Rule(pattern=pattern, role=role, reply=raw["reply"])
    tool = raw["tool_call"]
    if not isinstance(tool, dict):
        raise ValueError(f"{where}: 'tool_call' must be a table {{ name = ..., arguments = ... }}")
    _check_keys(tool, _TOOL_CALL_KEYS, where, " in tool_call")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: tool_call needs a 'name' string")
    arguments = tool.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: tool_call 'arguments' must be a table")
    for text in _strings(arguments):
        _check_fields(text, groups, where)
    return Rule(pattern=pattern, role=role, tool_name=name, tool_arguments=arguments)


def _check_keys(table: dict[str, Any], valid: tuple[str, ...], where: str, inside: str) -> None:
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}{inside} (valid: {', '.join(valid)})")


def _check_fields(template: str, groups: int, where: str) -> None:
    # Only numbered references are checked: `{word}` that is no named group stays literal text.
    for found in _FIELD.finditer(template):
        key = found.group(1)
        if key.isdigit() and int(key) > groups:
            raise ValueError(
                f"{where}: {{{key}}} refers to a regex group that does not exist "
                f"(the pattern has {groups})"
            )


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


def _format(value: Any, match: re.Match[str], last: str) -> Any:
    """Fill the fields of a template, or of every string inside a table or an array."""
    if isinstance(value, dict):
        return {key: _format(item, match, last) for key, item in value.items()}
    if isinstance(value, list):
        return [_format(item, match, last) for item in value]
    if not isinstance(value, str):
        return value

    def field_value(found: re.Match[str]) -> str:
        key = found.group(1)
        if key == "last":
            return last
        if key.isdigit():
            return match.group(int(key)) or ""
        if key in match.re.groupindex:
            return match.group(key) or ""
        return found.group(0)

    return _FIELD.sub(field_value, value)


# -- JSON schema sampler -----------------------------------------------------------------------


def sample_from_schema(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A deterministic JSON value that satisfies common JSON schemas (first choices, zeros)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 12:
        return "stub"
    if "$ref" in schema:
        return sample_from_schema(_resolve_ref(root, str(schema["$ref"])), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            # Prefer a non-null option so Optional[X] fields get an X.
            chosen = next((o for o in options if _type_of(o, root) != "null"), options[0])
            return sample_from_schema(chosen, root, depth + 1)
    kind = _type_of(schema, root)
    if kind == "object":
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            return {}
        return {name: sample_from_schema(sub, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        if schema.get("maxItems") == 0:
            return []
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            return [sample_from_schema(item, root, depth + 1) for item in prefix]
        return [sample_from_schema(schema.get("items", {"type": "string"}), root, depth + 1)]
    if kind in ("integer", "number"):
        return (int if kind == "integer" else float)(_clamp(0, schema))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = "stub"
    min_length, max_length = schema.get("minLength"), schema.get("maxLength")
    if isinstance(min_length, int) and len(text) < min_length:
        text += "x" * (min_length - len(text))
    if isinstance(max_length, int):
        text = text[:max_length]
    return text


def _type_of(schema: Any, root: Any) -> str:
    if not isinstance(schema, dict):
        return "string"
    if "$ref" in schema:
        return _type_of(_resolve_ref(root, str(schema["$ref"])), root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if not part:
            continue
        if not isinstance(node, dict):
            return {}
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
    return node


def _clamp(value: float, schema: Mapping[str, Any]) -> float:
    low, high = schema.get("minimum"), schema.get("maximum")
    exclusive_low = schema.get("exclusiveMinimum")
    if isinstance(low, (int, float)) and value < low:
        value = low
    if isinstance(exclusive_low, (int, float)) and value <= exclusive_low:
        value = exclusive_low + 1
    if isinstance(high, (int, float)) and value > high:
        value = high
    return value


# -- chat completions --------------------------------------------------------------------------


@dataclass
class Reply:
    """What the assistant says: text or tool calls, and why it stopped."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str


def error_body(message: str, kind: str, code: int = 400, *, param: str | None = None) -> Any:
    """An error body shaped like vLLM's (and OpenAI's): `{"error": {message, type, code}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_chat_request(body: bytes, served_model: str) -> tuple[int, Any]:
    """`(200, payload)` for a good `/v1/chat/completions` body, else `(status, error body)`."""
    try:
        payload = json.loads(body or b"null")
    except ValueError:
        return 400, error_body("request body is not valid JSON", "BadRequestError")
    if not isinstance(payload, dict):
        return 400, error_body("request body must be a JSON object", "BadRequestError")
    model = payload.setdefault("model", served_model)
    if model != served_model:
        problem = f"The model `{model}` does not exist."
        return 404, error_body(problem, "NotFoundError", 404, param="model")
    messages = payload.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        problem = "'messages' must be a non-empty list of message objects"
        return 400, error_body(problem, "BadRequestError", param="messages")
    return 200, payload


def compose_reply(
    payload: Mapping[str, Any], rules: Sequence[Rule], next_id: Callable[[], int]
) -> Reply:
    """Pick the reply to a checked payload: a script rule, then a forced tool, a response
    format, the echo. `next_id` numbers the tool calls."""
    last = payload["messages"][-1]
    role = str(last.get("role", "user"))
    content = _text_of(last.get("content"))
    tools = payload.get("tools")
    tool_choice = payload.get("tool_choice")
    # A model cannot call a tool it was not offered (or was told not to call).
    tools_allowed = bool(tools) and tool_choice != "none"

    def call(name: str, arguments: Any) -> Reply:
        function = {"name": name, "arguments": json.dumps(arguments)}
        return Reply(
            None,
            [{"id": f"call_{next_id()}", "type": "function", "function": function}],
            "tool_calls",
        )

    for rule in rules:
        if rule.tool_name is not None and not tools_allowed:
            continue
        found = rule.match(role, content)
        if found is None:
            continue
        if rule.tool_name is not None:
            return call(rule.tool_name, _format(rule.tool_arguments, found, content))
        return _limit(_format(rule.reply or "", found, content), payload)

    forced = _forced_tool(tools, tool_choice) if tools_allowed else None
    if forced is not None:
        name, parameters = forced
        arguments = sample_from_schema(parameters)
        return call(name, arguments if isinstance(arguments, dict) else {})

    response_format = payload.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
            return Reply(json.dumps(sample_from_schema(schema)), None, "stop")
        if kind == "json_object":
            return Reply("{}", None, "stop")
    return _limit(f"echo: {content}", payload)


def usage_of(messages: Sequence[Mapping[str, Any]], reply: Reply) -> dict[str, int]:
    """Token usage, one token a word (and one more a prompt message)."""
    prompt = sum(_words(_text_of(m.get("content"))) + 1 for m in messages)
    if reply.tool_calls is not None:
        completion = sum(_words(c["function"]["arguments"]) for c in reply.tool_calls)
    else:
        completion = _words(reply.content or "")
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def completion_body(
    completion_id: str, model: str, reply: Reply, usage: dict[str, int]
) -> dict[str, Any]:
    """The `chat.completion` object of a non-streamed answer."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls is not None:
        message["tool_calls"] = reply.tool_calls
    finish = reply.finish_reason
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def stream_events(
    completion_id: str, model: str, reply: Reply, usage: dict[str, int] | None
) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` events of a streamed answer, one word a chunk; with `usage`,
    a last chunk carries it (`stream_options.include_usage`). `[DONE]` is not included."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if usage is not None:
            data["usage"] = None  # OpenAI: every chunk but the last carries usage: null
        return data

    events = [chunk({"role": "assistant", "content": ""})]
    for index, call in enumerate(reply.tool_calls or []):
        function = call["function"]
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": function["name"], "arguments": ""},
        }
        events.append(chunk({"tool_calls": [head]}))
        for piece in _pieces(function["arguments"]):
            events.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    if reply.tool_calls is None:
        events.extend(chunk({"content": piece}) for piece in _pieces(reply.content or ""))
    events.append(chunk({}, reply.finish_reason))
    if usage is not None:
        events.append({**chunk({}), "choices": [], "usage": usage})
    return events


def _limit(text: str, payload: Mapping[str, Any]) -> Reply:
    # Like a real server, stop at max_tokens (one token per word here).
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and _words(text) > limit:
        found = re.match(rf"\s*(?:\S+\s+){{{max(limit, 0)}}}", text)
        return Reply(found.group(0).rstrip() if found else text, None, "length")
    return Reply(text, None, "stop")


def _forced_tool(tools: object, tool_choice: object) -> tuple[str, Any] | None:
    """The (name, parameters schema) that `tool_choice` forces, if it forces one."""
    if not isinstance(tools, list):
        return None
    functions = [
        t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    wanted: str | None = None
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            wanted = function["name"]
    elif tool_choice != "required":
        return None
    for function in functions:
        if wanted is None or function.get("name") == wanted:
            return str(function.get("name", "")), function.get("parameters", {})
    return None


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: object) -> str:
    """The text of a message's `content`: a string, a list of parts, or nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _pieces(text: str) -> list[str]:
    """The streamed pieces of a text: one word each, with its following whitespace."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]
