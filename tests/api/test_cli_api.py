"""`cave sandbox create|ls|exec|stop|rm` and `cave keys ...` in-process against the real API."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from cave import __version__
from cluster.cli.main import main


@pytest.fixture
def api_env(api_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The API as `cave up` leaves it: known only from $CAVE_HOME/api.json."""
    monkeypatch.delenv("CAVE_API_URL", raising=False)
    monkeypatch.delenv("CAVE_API_KEY", raising=False)
    monkeypatch.setenv("CAVE_HOME", str(tmp_path))
    saved = {"url": api_server.url, "admin_key": api_server.admin_key}
    (tmp_path / "api.json").write_text(json.dumps(saved))
    return api_server


def cave(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what earlier commands printed is not this one's
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def listed_ids(capsys: pytest.CaptureFixture[str], *options: str) -> set[str]:
    code, out, _ = cave(capsys, "sandbox", "ls", "--json", *options)
    assert code == 0
    return {item["id"] for item in json.loads(out)}


def test_sandbox_lifecycle(api_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"cli-{secrets.token_hex(4)}"
    code, out, _ = cave(
        capsys, "sandbox", "create", "--name", name, "--memory-mb", "128", "--label", "by=cli",
        "--json",
    )  # fmt: skip
    assert code == 0
    created = json.loads(out)
    sandbox_id = created["id"]
    assert (created["name"], created["state"], created["labels"]) == (
        name,
        "running",
        {"by": "cli"},
    )
    assert created["limits"]["memory_mb"] == 128

    code, out, _ = cave(capsys, "sandbox", "ls")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "NAME", "NAMESPACE", "STATE", "CREATED"]
    assert any(row.split()[:2] == [sandbox_id, name] and "running" in row for row in rows)

    code, out, err = cave(
        capsys, "sandbox", "exec", sandbox_id, "--", "sh", "-c", "echo out; echo err >&2; exit 7"
    )
    assert (code, out, err) == (7, "out\n", "err\n")

    code, out, _ = cave(capsys, "sandbox", "stop", sandbox_id)
    assert (code, out.strip()) == (0, sandbox_id)
    assert sandbox_id not in listed_ids(capsys)  # ls shows running sandboxes
    assert sandbox_id in listed_ids(capsys, "--all")
    assert sandbox_id in listed_ids(capsys, "--state", "stopped")

    code, out, _ = cave(capsys, "sandbox", "rm", sandbox_id)
    assert (code, out.strip()) == (0, sandbox_id)
    assert sandbox_id not in listed_ids(capsys, "--all")


def test_exec_in_unknown_sandbox_is_an_error(
    api_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cave(capsys, "sandbox", "exec", "no-such-sandbox", "--", "true")
    assert (code, out) == (2, "")
    assert err.startswith("cave: error: ") and "no-such-sandbox" in err


def test_options_and_variables_come_before_api_json(
    api_env: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAVE_API_KEY", "cave_live_nope_nope")
    code, _, err = cave(capsys, "sandbox", "ls")
    assert code == 2 and err.startswith("cave: error: ")
    code, _, _ = cave(capsys, "sandbox", "ls", "--api-key", api_env.admin_key)
    assert code == 0


def test_no_api_known_is_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CAVE_API_URL", raising=False)
    monkeypatch.setenv("CAVE_HOME", str(tmp_path))
    code, _, err = cave(capsys, "sandbox", "ls")
    assert code == 2
    assert "cave up" in err and err.startswith("cave: error: ")


def test_keys_lifecycle(api_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = f"cli-{secrets.token_hex(4)}"
    code, out, _ = cave(
        capsys, "keys", "create", "--namespace", namespace, "--scope", "sandboxes:read",
        "--name", "ci", "--json",
    )  # fmt: skip
    assert code == 0
    created = json.loads(out)
    assert (created["namespace"], created["scopes"], created["name"]) == (
        namespace, ["sandboxes:read"], "ci",
    )  # fmt: skip
    assert created["key"].startswith("cave_live_")

    code, out, _ = cave(capsys, "keys", "ls", "--namespace", namespace)
    assert code == 0
    assert any(row.split()[0] == created["id"] and "active" in row for row in out.splitlines())

    code, out, err = cave(capsys, "keys", "rotate", created["id"], "--grace-s", "60")
    assert code == 0
    new_key = out.splitlines()[-1]
    assert new_key.startswith("cave_live_") and new_key != created["key"]
    assert "only time" in err
    code, _, _ = cave(capsys, "sandbox", "ls", "--api-key", new_key)
    assert code == 0

    code, out, _ = cave(capsys, "keys", "revoke", created["id"])
    assert (code, out.strip()) == (0, created["id"])
    code, out, _ = cave(capsys, "keys", "ls", "--namespace", namespace, "--json")
    states = {key["id"]: key["revoked_at"] for key in json.loads(out)}
    assert states[created["id"]] is not None


def test_a_create_in_a_full_pool_is_an_error_naming_it(
    api_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cave(capsys, "sandbox", "create", "--pool", "nowhere", "--wait-s", "0.2")
    assert (code, out) == (2, "")
    assert err.startswith("cave: error: ") and "'nowhere'" in err


# Run as a program on a machine that has neither Ray nor libseccomp: importing either fails.
WITHOUT_RAY = """
import importlib.abc, sys
MISSING = ("ray", "pyseccomp", "seccomp", "actors", "deployments", "inference", "torch")
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ImportError(f"No module named {name!r} (not on this machine)")
sys.meta_path.insert(0, Missing())
from cluster.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["completion", "bash"],
        ["sandbox", "ls", "--json"],
        ["keys", "ls", "--json"],
        ["sandbox", "--help"],
    ],
    ids=" ".join,
)
def test_the_api_commands_work_without_ray_or_libseccomp(api_env: Any, argv: list[str]) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    if "--help" in argv:
        assert "usage: cave" in done.stdout
    elif argv == ["--version"]:
        assert done.stdout == f"cave {__version__}\n"
    elif argv[0] == "completion":
        assert "complete -o default -F _cave_complete cave" in done.stdout
    else:
        assert isinstance(json.loads(done.stdout), list)  # what the API answered


def test_building_the_parser_loads_no_client_no_pydantic_and_no_audit_code() -> None:
    """`cave --help` costs the parser alone; the client and the audit code load with their verbs."""
    import subprocess
    import sys

    probe = (
        "import sys; from cluster.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('cave.client', 'pydantic', 'cave.audit', 'httpx') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr


def test_the_cli_names_the_clients_variables_and_values() -> None:
    import cave.client as sdk
    from cave.audit import settings as audit_settings
    from cluster.cli import api_config, audit_cmds
    from cluster.cli.base import ClientValues

    assert (api_config.URL_ENV, api_config.KEY_ENV) == (sdk.URL_ENV, sdk.KEY_ENV)
    assert audit_cmds.KEY_VARIABLE == audit_settings.KEY_VARIABLE
    assert list(ClientValues("SCOPES")) == list(sdk.SCOPES)
    assert list(ClientValues("SANDBOX_STATES")) == list(sdk.SANDBOX_STATES)
