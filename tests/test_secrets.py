"""Secret-leak scan: API keys and proxy tokens never appear in any output of any surface."""

from __future__ import annotations

import os

import pytest
from conftest import API_KEY, PROXY_KEY, PROXY_SECRET, assert_no_secrets, run_cli


@pytest.mark.parametrize("key", [API_KEY, "sk-wrong-but-secret-9931"])
def test_cli_commands_never_print_keys(tmp_path, endpoint_server, key, monkeypatch):
    server = endpoint_server(api_key=API_KEY)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.modal-vllm.platforms.keyed]\nkind = "url"\nbase_url = "{server.base_url}"\n'
    )
    env = {**os.environ, "VLLM_API_KEY": key}
    outputs = []
    for args in (
        ("platforms",),
        ("platforms", "--json"),
        ("wake", "keyed", "--timeout", "5"),
        ("status", "keyed"),
    ):
        result = run_cli(tmp_path, *args, env=env)
        outputs += [result.stdout, result.stderr]
        if args[0] == "wake":
            assert result.returncode == (0 if key == API_KEY else 4), result.stderr
    assert_no_secrets(*outputs)
    assert key not in "".join(outputs)


def test_failures_printing_clients_and_endpoints_leak_nothing(
    pytester, endpoint_server, write_platforms, monkeypatch, tmp_path
):
    server = endpoint_server(api_key=API_KEY, proxy_auth=(PROXY_KEY, PROXY_SECRET))
    write_platforms({"guarded": {"kind": "url", "base_url": server.base_url}})
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    # A url platform has no proxy_auth field: headers come from a modal platform only, so this
    # endpoint answers 401 to the plugin's probes; the wake must fail without printing keys.
    result = pytester.runpytest_subprocess("--vllm-platform=guarded", "-vv", "-rA")
    assert result.ret == 4
    assert_no_secrets(result.stdout.str(), result.stderr.str())
    assert "proxy auth" in result.stderr.str()
