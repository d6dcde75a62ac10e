"""Platforms: validation, the three sources and their order, paths, `${VAR}`, built-ins."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from pytest_modal_vllm.errors import ConfigError
from pytest_modal_vllm.platforms import (
    BUNDLED_LLAMA,
    BUNDLED_QWEN,
    FIELD_KINDS,
    KINDS,
    Platform,
    builtin_platforms,
    check_base_url,
    load_platforms,
    normalize_base_url,
    select,
    validate,
)


def error_of(call: Any, *args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------- validate


def test_validate_builds_a_platform_with_stored_forms() -> None:
    platform = validate(
        "srv",
        {
            "kind": "process",
            "command": ["vllm", "serve", "{model}", "--port", "{port}"],
            "env": {"A": "x", "N": 8, "F": 0.5, "ON": True, "OFF": False},
            "model": "m",
            "capabilities": ["streaming", "tools"],
            "client": {"timeout": 5, "extra_body": {"top_k": 1}},
            "wake_timeout": 12,
            "keep_alive": "ping",
            "keep_alive_interval": 0.5,
        },
        "pyproject.toml",
        "/somewhere",
    )
    assert platform.name == "srv"
    assert platform.kind == "process"
    assert platform.source == "pyproject.toml"
    assert platform.command == ("vllm", "serve", "{model}", "--port", "{port}")
    assert platform.env == {"A": "x", "N": "8", "F": "0.5", "ON": "1", "OFF": "0"}
    assert platform.capabilities == ("streaming", "tools")
    assert platform.client == {"timeout": 5, "extra_body": {"top_k": 1}}
    assert (platform.wake_timeout, platform.keep_alive) == (12, "ping")
    assert platform.base_dir == "/somewhere"


def test_validate_leaves_unset_fields_to_the_resolution() -> None:
    url = validate("u", {"kind": "url", "base_url": "http://h/v1"}, "x")
    assert (url.wake_timeout, url.keep_alive) == (None, None)  # the kind's default, later
    assert url.api_key_env == "VLLM_API_KEY"
    assert url.capabilities == ("streaming",)
    assert url.client == {}
    modal = validate("m", {"kind": "modal", "app": "a"}, "x")
    assert modal.target() == "modal app a/serve"
    assert validate("m", {"kind": "modal", "app": "a", "server": "S"}, "x").target() == (
        "modal app a/S"
    )
    stub = validate("s", {"kind": "stub"}, "x")
    assert (stub.cold_start, stub.script) == (0.0, None)


def test_the_schema_lives_beside_the_fields() -> None:
    """FIELD_KINDS is derived from the dataclass: every user field, no internal one."""
    names = {f.name for f in fields(Platform)}
    assert set(FIELD_KINDS) == (names - {"name", "source", "preflight", "base_dir"})
    assert FIELD_KINDS["base_url"] == ("url",)
    assert FIELD_KINDS["deploy_env"] == ("modal",)
    assert FIELD_KINDS["client"] == KINDS


@pytest.mark.parametrize(
    ("table", "fragments"),
    [
        (
            {"kind": "url", "base_url": "http://h/v1", "base_ulr": "x"},
            ["unknown field 'base_ulr' (did you mean 'base_url'?) in src", "valid fields"],
        ),
        (
            {"kind": "stub", "app": "a"},
            ["field 'app' does not apply to kind 'stub'", "it is for kind 'modal'"],
        ),
        ({"kind": "url", "base_url": "http://h/v1", "model": 3}, ["'model' must be a string"]),
        (
            {"kind": "url", "base_url": "http://h/v1", "wake_timeout": False},
            ["'wake_timeout' must be a number"],
        ),
        ({"kind": "process", "command": []}, ["field 'command' is empty"]),
        ({"kind": "process", "command": "vllm serve"}, ["'command' must be a list of strings"]),
        (
            {"kind": "process", "command": ["x"], "env": {"A": ["b"]}},
            ["'env' must map names to strings; 'A' is not"],
        ),
        (
            {"kind": "modal", "app": "a", "deploy_env": "GPU=H100"},
            ["'deploy_env' must be a table of strings"],
        ),
        ({"kind": "stub", "cold_start": -0.1}, ["'cold_start' must be 0 or more"]),
        (
            {"kind": "url", "base_url": "http://h/v1", "keep_alive_interval": -1},
            ["'keep_alive_interval' must be a positive number"],
        ),
        ({"kind": "stub", "keep_alive": "autoscaler"}, ["needs kind 'modal'"]),
        (
            {"kind": "url", "base_url": "http://h/v1", "client": {"max_retry": 1}},
            ["unknown client option 'max_retry' (did you mean 'max_retries'?)"],
        ),
        ({"kind": "process"}, ["kind 'process' needs field 'command'"]),
        (
            {"kind": "modal", "app": "a", "function": "f", "server": "s"},
            ["both 'function' and 'server'"],
        ),
        ({"kind": "Modal"}, ["unknown kind 'Modal' (did you mean 'modal'?)"]),
        ({"model": "m"}, ["no 'kind' in src"]),
    ],
)
def test_validate_rejects(table: dict[str, Any], fragments: list[str]) -> None:
    error = error_of(validate, "p", table, "src")
    text = str(error)
    assert text.startswith("vllm platform 'p': ")
    assert "Fix:" in text
    for fragment in fragments:
        assert fragment in text
    assert error.exit_code == 4


def test_every_field_is_valid_for_some_kind_and_every_kind_has_fields() -> None:
    assert set(FIELD_KINDS) == {
        f
        for f in Platform.__dataclass_fields__
        if f not in ("name", "source", "preflight", "base_dir")
    } | {"kind"}
    for kinds in FIELD_KINDS.values():
        assert set(kinds) <= set(KINDS)


def test_a_base_url_with_a_variable_is_checked_after_expansion_only() -> None:
    platform = validate("u", {"kind": "url", "base_url": "${MY_URL}"}, "x")
    assert platform.base_url == "${MY_URL}"


# ---------------------------------------------------------------------------- base URLs


@pytest.mark.parametrize(
    "url",
    [
        "http://h/v1",
        "https://h",
        "https://h/",
        "http://127.0.0.1:8000/v1/",
        "https://org--app-serve.modal.run/v1",
        "http://h/prefix/v1",
    ],
)
def test_check_base_url_accepts(url: str) -> None:
    check_base_url("p", url, "here")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://h/v1", "is not an http(s) URL"),
        ("h:8000/v1", "is not an http(s) URL"),
        ("http:///v1", "is not an http(s) URL"),
        ("http://h/api", "does not end in /v1"),
        ("http://h/v1/chat", "does not end in /v1"),
    ],
)
def test_check_base_url_rejects(url: str, fragment: str) -> None:
    text = str(error_of(check_base_url, "p", url, "here"))
    assert fragment in text
    assert "vllm platform 'p'" in text
    assert "Fix:" in text


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("https://h", "https://h/v1"),
        ("https://h/", "https://h/v1"),
        ("https://h/v1", "https://h/v1"),
        ("https://h/v1/", "https://h/v1"),
        ("http://127.0.0.1:9/prefix/v1", "http://127.0.0.1:9/prefix/v1"),
    ],
)
def test_normalize_base_url(url: str, normal: str) -> None:
    assert normalize_base_url(url) == normal


# ---------------------------------------------------------------------------- sources


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_builtins_only_without_files(tmp_path: Path) -> None:
    known = load_platforms(tmp_path, None)
    assert set(known) == {"stub", "local", "env", "modal-llama", "modal-qwen"}
    assert {p.source for p in known.values()} == {"built-in"}
    assert set(load_platforms(None, None)) == set(known)


def test_pyproject_replaces_builtins_and_config_file_replaces_pyproject(tmp_path: Path) -> None:
    write(
        tmp_path / "pyproject.toml",
        """
[project]
name = "x"

[tool.modal-vllm.platforms.stub]
kind = "url"
base_url = "http://pyproject/v1"

[tool.modal-vllm.platforms.mine]
kind = "url"
base_url = "http://pyproject/v1"

[tool.modal-vllm.platforms.only-pyproject]
kind = "stub"
""",
    )
    write(
        tmp_path / "conf" / "extra.toml",
        """
[platforms.mine]
kind = "stub"
model = "from-config"

[platforms.modal-qwen]
kind = "url"
base_url = "http://config/v1"
""",
    )
    known = load_platforms(tmp_path, str(tmp_path / "conf" / "extra.toml"))
    assert (known["stub"].kind, known["stub"].source) == ("url", "pyproject.toml")
    assert (known["mine"].kind, known["mine"].model) == ("stub", "from-config")
    assert known["mine"].source == str(tmp_path / "conf" / "extra.toml")
    assert known["modal-qwen"].base_url == "http://config/v1"
    assert known["only-pyproject"].source == "pyproject.toml"
    assert known["local"].source == "built-in"
    # A later definition replaces the whole table, it does not merge fields.
    assert known["mine"].base_url is None


def test_config_file_relative_to_rootdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "extra.toml", '[platforms.x]\nkind = "stub"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    known = load_platforms(tmp_path, "extra.toml")
    assert known["x"].source == "extra.toml"


def test_relative_paths_resolve_against_the_defining_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path / "pyproject.toml",
        """
[tool.modal-vllm.platforms.a]
kind = "stub"
script = "rules/a.toml"

[tool.modal-vllm.platforms.m]
kind = "modal"
app = "x"
modal_app = "apps/server.py"
""",
    )
    write(
        tmp_path / "conf" / "extra.toml",
        f"""
[platforms.b]
kind = "stub"
script = "b.toml"

[platforms.c]
kind = "stub"
script = "{tmp_path / "abs.toml"}"
""",
    )
    monkeypatch.chdir(tmp_path / "conf")  # the current directory does not matter
    known = load_platforms(tmp_path, str(tmp_path / "conf" / "extra.toml"))
    a, b, c, m = known["a"], known["b"], known["c"], known["m"]
    assert a.resolve_path(a.script or "") == tmp_path / "rules" / "a.toml"
    assert m.resolve_path(m.modal_app or "") == tmp_path / "apps" / "server.py"
    assert b.resolve_path(b.script or "") == tmp_path / "conf" / "b.toml"
    assert c.resolve_path(c.script or "") == tmp_path / "abs.toml"
    assert a.resolve_path("~/x.toml") == Path.home() / "x.toml"


def test_pyproject_without_the_section_is_fine(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n[tool.ruff]\nline-length = 99\n')
    assert "stub" in load_platforms(tmp_path, None)


def test_source_named_in_errors(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.modal-vllm.platforms.x]\nkind = "url"\n')
    assert "missing in pyproject.toml" in str(error_of(load_platforms, tmp_path, None))
    write(tmp_path / "pyproject.toml", "")
    write(tmp_path / "extra.toml", '[platforms.y]\nkind = "url"\n')
    text = str(error_of(load_platforms, tmp_path, str(tmp_path / "extra.toml")))
    assert f"missing in {tmp_path / 'extra.toml'}" in text
    assert "vllm platform 'y'" in text


def test_missing_config_file_and_bad_toml(tmp_path: Path) -> None:
    text = str(error_of(load_platforms, tmp_path, "nope.toml"))
    assert "does not exist" in text
    assert "--vllm-config" in text
    write(tmp_path / "bad.toml", "[platforms.x\n")
    assert "is not valid TOML" in str(error_of(load_platforms, tmp_path, "bad.toml"))


# ---------------------------------------------------------------------------- select


def test_select_keeps_the_order() -> None:
    known = builtin_platforms()
    assert [p.name for p in select(known, ["modal-qwen", "stub"])] == ["modal-qwen", "stub"]
    assert select(known, []) == []


def test_select_unknown_names_the_closest_and_the_known_ones() -> None:
    text = str(error_of(select, builtin_platforms(), ["stub", "modal-qwn"]))
    assert "unknown platform 'modal-qwn' (did you mean 'modal-qwen'?)" in text
    assert "use one of env, local, modal-llama, modal-qwen, stub" in text
    assert "[tool.modal-vllm.platforms.modal-qwn]" in text
    text = str(error_of(select, builtin_platforms(), ["zzzz"]))
    assert "did you mean" not in text


# ---------------------------------------------------------------------------- built-ins


def test_builtins_have_the_documented_kinds_and_capabilities() -> None:
    known = builtin_platforms()
    assert {name: p.kind for name, p in known.items()} == {
        "stub": "stub",
        "local": "process",
        "env": "url",
        "modal-llama": "modal",
        "modal-qwen": "modal",
    }
    assert {"tools", "json_schema", "streaming"} <= set(known["modal-qwen"].capabilities)
    assert {"tools", "streaming"} <= set(known["stub"].capabilities)
    assert "tools" not in known["modal-llama"].capabilities
    assert "tools" not in known["local"].capabilities
    assert known["modal-llama"].model == BUNDLED_LLAMA
    assert known["modal-qwen"].model == BUNDLED_QWEN
    assert known["modal-qwen"].deploy_env["MODEL_NAME"] == BUNDLED_QWEN
    assert known["modal-qwen"].deploy_env.get("TOOL_CALL_PARSER")
    assert known["modal-llama"].app != known["modal-qwen"].app
    assert known["env"].base_url == "${VLLM_API_URL}"
    assert known["env"].api_key_env == "VLLM_API_KEY"
    assert any("{port}" in arg for arg in known["local"].command)
    assert {p.source for p in known.values()} == {"built-in"}


def test_targets() -> None:
    known = builtin_platforms()
    assert known["modal-qwen"].target() == "modal app modal-vllm-qwen/serve"
    assert known["stub"].target() == "in-process stub"
    assert known["env"].target() == "${VLLM_API_URL}"
