"""Model endpoints kept in Airflow connections, turned into babelsynth config overrides.

The core package never reads Airflow: it gets a base_url and the NAME of an env var holding the API key.
This hook is the one place a connection becomes those two things. Connections are read the task-SDK way
(`BaseHook.get_connection`: the task's Airflow, a secrets backend or AIRFLOW_CONN_<ID>).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

# Airflow connection -> the model roles whose OpenAI-compatible endpoint it sets. Params still win.
ENDPOINT_CONNECTIONS = {"babelsynth_teacher": ("teacher",), "babelsynth_llm": ("judge", "rephraser")}


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or a config


class BabelsynthEndpointHook(BaseHook):
    """An OpenAI-compatible endpoint (a vLLM server) in a connection: host, port and schema form the /v1
    URL (https when the conn type or extra {"https": true} says so); the password, if any, is the API key."""

    conn_name_attr = "babelsynth_conn_id"
    default_conn_name = "babelsynth_teacher"
    conn_type = "http"
    hook_name = "babelsynth model endpoint"

    def __init__(self, babelsynth_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.babelsynth_conn_id = babelsynth_conn_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.babelsynth_conn_id!r})"

    @property
    def key_env(self) -> str:
        """The env var that carries this connection's key to the library, e.g. BABELSYNTH_TEACHER_API_KEY."""
        return f"BABELSYNTH_{self.babelsynth_conn_id.removeprefix('babelsynth_').upper()}_API_KEY"

    def get_conn(self) -> Endpoint:
        c = self.get_connection(self.babelsynth_conn_id)
        if not c.host:
            raise ValueError(f"Airflow connection {self.babelsynth_conn_id!r} has no host")
        https = c.conn_type == "https" or c.extra_dejson.get("https")
        url = (
            f"{'https' if https else 'http'}://{c.host}"
            + (f":{c.port}" if c.port else "")
            + (f"/{c.schema.strip('/')}" if c.schema else "")
        )
        return Endpoint(url, c.password or None)

    def overrides(self, roles: tuple[str, ...], with_keys: bool = True) -> dict[str, Any]:
        """Config overrides pointing `roles` at this endpoint.

        with_keys: the key is exported to `key_env` in this process only (tasks, venvs it starts) and the
        config names that variable. Without (pods): the URL only; pods get keys from Kubernetes secrets,
        so a key never lands in an argv.
        """
        ep = self.get_conn()
        out: dict[str, Any] = {f"models.{r}.base_url": ep.base_url for r in roles}
        if with_keys and ep.api_key:
            os.environ[self.key_env] = ep.api_key
            out.update({f"models.{r}.api_key_env": self.key_env for r in roles})
        return out


def endpoint_overrides(with_keys: bool = True) -> dict[str, Any]:
    """Overrides from every endpoint connection that exists (e.g.
    AIRFLOW_CONN_BABELSYNTH_TEACHER='http://:KEY@host:8000/v1'); a missing one leaves the config as is."""
    out: dict[str, Any] = {}
    for conn_id, roles in ENDPOINT_CONNECTIONS.items():
        try:
            out.update(BabelsynthEndpointHook(conn_id).overrides(roles, with_keys))
        except AirflowNotFoundException:
            continue
    return out
