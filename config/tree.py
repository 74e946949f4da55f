"""The one tree of CAVE's settings: every section as a field of `CaveSettings`, each section's
fields declaring their environment variable (cave/settings_env.py).

The tree sits in config/ because every section can be imported from here without importing
upwards: cave/ owns the database, auth and audit sections and the run mode, config/ the sandbox,
model-access and API sections. docs/configuration.md is generated from it (config/docs.py), and
tests/test_configuration_docs.py checks that every variable the code names is declared here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from pydantic import BaseModel, Field

from cave.audit.settings import AuditSettings, load_audit_settings
from cave.auth.settings import AuthSettings, load_auth_settings
from cave.db.settings import DatabaseSettings, load_database_settings
from cave.settings_env import CaveEnvironment, Declared, declared, load_section
from config.api import (
    ApiLimits,
    ClientSettings,
    ClusterSettings,
    ExecRecordSettings,
    ModelsSettings,
    TracingSettings,
    UpkeepSettings,
)
from config.llm import LlmSettings, load_llm_settings
from config.settings import Settings, load_settings


class CaveSettings(BaseModel, frozen=True, extra="forbid"):
    """Every setting of CAVE, one section per field. `load_cave_settings` builds it at an entry
    point (an API replica's start); each section has its own loader (`load_settings`,
    `load_database_settings`, ...) for code that needs only that one."""

    environment: CaveEnvironment = Field(
        title="Run mode", description="`cave.settings_env.is_production`, in every section"
    )
    sandbox: Settings = Field(
        title="Sandboxes",
        description="`config.settings.load_settings`",
        json_schema_extra={"toml": "config/sandbox_config.toml"},
    )
    database: DatabaseSettings = Field(
        title="Database", description="`cave.db.load_database_settings`"
    )
    auth: AuthSettings = Field(
        title="API keys and their secrets", description="`cave.auth.settings.load_auth_settings`"
    )
    audit: AuditSettings = Field(title="Audit log", description="`cave.audit.load_audit_settings`")
    llm: LlmSettings = Field(title="Model access", description="`config.llm.load_llm_settings`")
    models: ModelsSettings = Field(title="Models", description="`ModelRegistry.from_env`")
    api_limits: ApiLimits = Field(
        title="API request limits", description="`deployments.http.body_limit.load_request_limits`"
    )
    upkeep: UpkeepSettings = Field(
        title="API upkeep",
        description="`config.tree.load_cave_settings` (the API replica's `Upkeep`)",
    )
    exec_records: ExecRecordSettings = Field(
        title="Exec records", description="`load_cave_settings`, for the replica's `ExecRecorder`"
    )
    tracing: TracingSettings = Field(
        title="Tracing", description="`deployments.http.tracing.load_sampling_rate`"
    )
    cluster: ClusterSettings = Field(
        title="`cave up`", description="`cluster.api`, `cluster.ingress`, `cluster.cli.base`"
    )
    client: ClientSettings = Field(
        title="Client",
        description="`cave.client` (its own distribution) and the CLI's API commands",
    )


def load_cave_settings(env: Mapping[str, str] | None = None) -> CaveSettings:
    """Every section from `env` (default os.environ), each by its own loader: a bad value
    anywhere is a ConfigError naming it before anything starts. Outside production, the auth
    section makes up the secrets it lacks (in CAVE_SECRETS_DIR), as `load_auth_settings` does."""
    env = os.environ if env is None else env
    return CaveSettings(
        environment=load_section(CaveEnvironment, env),
        sandbox=load_settings(env),
        database=load_database_settings(env),
        auth=load_auth_settings(env),
        audit=load_audit_settings(env),
        llm=load_llm_settings(env),
        models=load_section(ModelsSettings, env),
        api_limits=load_section(ApiLimits, env),
        upkeep=load_section(UpkeepSettings, env),
        exec_records=load_section(ExecRecordSettings, env),
        tracing=load_section(TracingSettings, env),
        cluster=load_section(ClusterSettings, env),
        client=load_section(ClientSettings, env),
    )


def sections() -> Iterator[tuple[str, type[BaseModel]]]:
    """(name, model) of each section of the tree, in order."""
    for name, field in CaveSettings.model_fields.items():
        assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        yield name, field.annotation


def variables() -> dict[str, Declared]:
    """Every variable the tree declares (a secret's NAME_FILE too) and the field it sets."""
    found: dict[str, Declared] = {}
    for item in declared(CaveSettings):
        for variable in item.variables:
            found.setdefault(variable, item)
    return found
