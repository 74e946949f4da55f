"""The `cave` command end to end: a real cluster from `cave up`, commands run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

NO_CLUSTER_HINT = "cave: error: no CAVE cluster is running; start one with `cave up`"
JSON_KEYS = {"exit_code", "timed_out", "oom_killed", "truncated", "duration_ms", "stdout", "stderr"}


def cave_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    # Sandboxes of this test session keep their state apart from a real /run/cave.
    return {
        **env,
        "CAVE_HOME": str(home),
        "CAVE_STATE_DIR": f"/run/cave-cli-test-{os.getpid()}",
        "BKG_DB_PATH": str(home / "cave.db"),
        "CAVE_SECRETS_DIR": str(home / "secrets"),
    }


def cave(
    env: dict[str, str], *args: str, stdin: bytes = b"", timeout_s: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as its own process, the way a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        input=stdin,
        env=env,
        capture_output=True,
        timeout=timeout_s,
    )


def cave_up(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    up = cave(env, "up", *args, timeout_s=240)
    if up.returncode != 0:
        cave(env, "down")
        pytest.fail(f"cave up failed ({up.returncode}):\n{up.stdout.decode()}{up.stderr.decode()}")
    return up


@pytest.fixture(scope="session")
def cluster_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = cave_env(tmp_path_factory.mktemp("cave-home"))
    cave_up(env)
    yield env
    cave(env, "down")
    _remove_state_dir(Path(env["CAVE_STATE_DIR"]))


@pytest.fixture
def own_cluster_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A second cluster for a test that ends it; downed again whatever the test did."""
    env = cave_env(tmp_path)
    cave_up(env, "--num-cpus", "1")
    yield env
    cave(env, "down")


def _remove_state_dir(path: Path) -> None:
    # Only when nothing is mounted below it: a leaked bind mount of the host's /usr must
    # never be deleted through.
    if str(path) not in Path("/proc/self/mountinfo").read_text():
        shutil.rmtree(path, ignore_errors=True)


def run(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return cave(env, "sandbox", "run", *args, stdin=stdin)


def test_up_serves_the_api_with_a_working_admin_key(cluster_env: dict[str, str]) -> None:
    info = json.loads((Path(cluster_env["CAVE_HOME"]) / "api.json").read_text())
    headers = {"Authorization": f"Bearer {info['admin_key']}"}
    listed = httpx.get(f"{info['url']}/api/v1/sandboxes", headers=headers, timeout=30)
    assert listed.status_code == 200, listed.text
    again = cave(cluster_env, "up")
    assert again.returncode == 0
    assert info["admin_key"] in again.stdout.decode()  # the same API, the same bootstrap key


def test_prints_the_command_output(cluster_env: dict[str, str]) -> None:
    done = run(cluster_env, "--", "python3", "-c", "print(1)")
    assert (done.returncode, done.stdout) == (0, b"1\n"), done.stderr


def test_exit_code_and_stderr_propagate(cluster_env: dict[str, str]) -> None:
    done = run(cluster_env, "--", "sh", "-c", "echo oops >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"", b"oops\n")


def test_json_is_the_only_stdout(cluster_env: dict[str, str]) -> None:
    done = run(
        cluster_env,
        "--json",
        "--env",
        "WHO=cave",
        "--",
        "sh",
        "-c",
        'echo "hi $WHO"; echo err >&2; exit 3',
    )
    result = json.loads(done.stdout)
    assert set(result) == JSON_KEYS
    assert done.returncode == result["exit_code"] == 3
    assert (result["stdout"], result["stderr"]) == ("hi cave\n", "err\n")
    assert result["timed_out"] is result["oom_killed"] is result["truncated"] is False


def test_timeout_exits_124(cluster_env: dict[str, str]) -> None:
    started = time.monotonic()
    done = run(cluster_env, "--json", "--timeout-s", "1", "--", "sleep", "30")
    assert done.returncode == 124, done.stderr
    assert json.loads(done.stdout)["timed_out"] is True
    assert time.monotonic() - started < 25


def test_timeout_note_on_stderr(cluster_env: dict[str, str]) -> None:
    done = run(cluster_env, "--timeout-s", "1", "--", "sleep", "30")
    assert done.returncode == 124
    assert b"cave: command timed out after 1 s" in done.stderr


def test_stdin_is_passed_through(cluster_env: dict[str, str]) -> None:
    done = run(cluster_env, "--", "cat", stdin=b"hi\n")
    assert (done.returncode, done.stdout) == (0, b"hi\n"), done.stderr


@pytest.mark.parametrize("value", ["-5", "999999"])
def test_bad_memory_limit_is_refused(cluster_env: dict[str, str], value: str) -> None:
    done = run(cluster_env, "--memory-mb", value, "--", "true")
    assert done.returncode == 2
    assert done.stderr.startswith(b"cave: error: memory_mb")
    assert b"Traceback" not in done.stderr


def test_missing_command_is_a_usage_error(cluster_env: dict[str, str]) -> None:
    done = run(cluster_env, "--")
    assert done.returncode == 2
    assert b"usage: cave sandbox run" in done.stderr and b"missing command" in done.stderr


def test_up_twice_keeps_the_running_cluster(cluster_env: dict[str, str]) -> None:
    first = json.loads((Path(cluster_env["CAVE_HOME"]) / "cluster.json").read_text())
    again = cave_up(cluster_env)
    assert b"already running" in again.stdout
    assert f"export RAY_ADDRESS={first['address']}".encode() in again.stdout


def test_no_cluster_gives_the_hint(tmp_path: Path) -> None:
    done = run(cave_env(tmp_path), "--", "true")
    assert done.returncode == 2
    assert done.stderr.decode().strip() == NO_CLUSTER_HINT


@pytest.mark.parametrize("pair", ["NOPE", "=value"])
def test_a_malformed_env_pair_is_refused_before_any_sandbox(tmp_path: Path, pair: str) -> None:
    done = run(cave_env(tmp_path), "--env", pair, "--", "true")  # no cluster: never reached
    assert done.returncode == 2
    assert done.stderr.decode().strip() == f"cave: error: --env expects KEY=VALUE, got {pair!r}"


def test_down_without_a_cluster_is_fine(tmp_path: Path) -> None:
    done = cave(cave_env(tmp_path), "down")
    assert done.returncode == 0 and b"no CAVE cluster was running" in done.stdout


def test_down_leaves_no_process(own_cluster_env: dict[str, str]) -> None:
    env, home = own_cluster_env, Path(own_cluster_env["CAVE_HOME"])
    info = json.loads((home / "cluster.json").read_text())
    assert run(env, "--", "true").returncode == 0  # workers and sandboxes have existed
    assert _cluster_processes(info["pid"], info["address"])
    down = cave(env, "down")
    assert down.returncode == 0, down.stderr
    assert _cluster_processes(info["pid"], info["address"]) == []
    assert not (home / "cluster.json").exists()


def _cluster_processes(leader: int, address: str) -> list[str]:
    """Live processes in the cluster's session, or raylet/gcs_server naming its GCS port."""
    port = address.rsplit(":", 1)[1]
    table = subprocess.run(
        ["ps", "-eo", "sid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in table.splitlines():
        sid, stat, args = (line.split(None, 2) + [""])[:3]
        words = args.split()
        names_port = any(w.endswith(f":{port}") or w.endswith(f"_port={port}") for w in words)
        ray_daemon = "raylet" in args or "gcs_server" in args
        if (int(sid) == leader or (ray_daemon and names_port)) and not stat.startswith("Z"):
            found.append(line)
    return found


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["cave", ""], {"up", "down", "sandbox", "keys", "audit", "completion", "--version"}),
        (["cave", "sandbox", "e"], {"exec"}),
        (["cave", "keys", "rotate", "--g"], {"--grace-s"}),
        (["cave", "completion", ""], {"bash", "zsh"}),
        (["cave", "sandbox", "run", "--", "pyth"], set()),  # the command's own words: not ours
    ],
)
def test_bash_completion_offers_what_the_parser_knows(
    tmp_path: Path, words: list[str], expected: set[str]
) -> None:
    script = cave(cave_env(tmp_path), "completion", "bash").stdout.decode()
    (tmp_path / "cave.bash").write_text(script)
    probe = (
        f"source {tmp_path / 'cave.bash'}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
        f"COMP_CWORD={len(words) - 1}; COMPREPLY=(); _cave_complete; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    offered = set(done.stdout.split())
    assert expected <= offered if expected else not offered


def test_version_names_the_release(tmp_path: Path) -> None:
    import cave as core

    done = cave(cave_env(tmp_path), "--version")
    assert (done.returncode, done.stdout.decode()) == (0, f"cave {core.__version__}\n")
