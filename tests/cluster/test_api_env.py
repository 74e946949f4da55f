"""`cave up`'s settings for the replicas (cluster.api.api_env): secrets given as files."""

from __future__ import annotations

from pathlib import Path

from cluster.api import api_env


def test_secret_files_are_made_absolute_and_a_dsn_file_means_postgresql(tmp_path: Path) -> None:
    env = {"BKG_DB_DSN_FILE": "secrets/dsn", "CAVE_KEY_PEPPER_FILE": "/run/secrets/pepper"}
    passed = api_env(env, tmp_path)
    # Replicas run in Ray's working directories: a relative path would name another file there.
    assert passed["BKG_DB_DSN_FILE"] == str(tmp_path / "secrets" / "dsn")
    assert passed["CAVE_KEY_PEPPER_FILE"] == "/run/secrets/pepper"
    assert "BKG_DB_PATH" not in passed  # no SQLite beside the DSN of the file
