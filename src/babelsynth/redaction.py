"""Secret values never reach a manifest, a printed config or a log line of the CLI.

Which values are secret is decided from the environment, where users put them: every variable whose name
says it holds a secret (…_KEY, …TOKEN…, …SECRET…, …PASSWORD…, credentials), every variable a config names
as `api_key_env`, and every URI with a password in any variable (an orchestrator's connection URIs, a
database URL): the URI and its password. Redaction replaces each such value (of at least MIN_LEN
characters) wherever it occurs, whatever way it came in (a `${VAR}` in the YAML, an override, a connection
turned into an env var), and masks the password of any URI with userinfo.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
MIN_LEN = 6  # shorter values (e.g. "test", "true") are not secrets and would mask half a path
MIN_URI_PASSWORD = 12  # shorter URI passwords are masked only inside a URI (the userinfo rule)
_NAME = re.compile(
    r"(?i)(secret|passw|passphrase|credential|private|(^|_)(api_?)?keys?($|_)|(^|_)tokens?($|_)|(^|_)pwd($|_))"
)
NOT_SECRETS = {"PWD", "OLDPWD"}  # the shell's working directories, not passwords: masking them hid paths
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def secret_names(cfg: Any = None, env: dict[str, str] | None = None) -> set[str]:
    """Names of the variables that hold secrets: by name, plus every `api_key_env` of the config."""
    env = os.environ if env is None else env
    names = {n for n in env if _NAME.search(n) and n not in NOT_SECRETS}
    if cfg is not None:
        for role in ("teacher", "judge", "rephraser", "llm_translator", "safety_judge"):
            name = getattr(getattr(cfg.models, role, None), "api_key_env", None)
            if name:
                names.add(name)
    return names


def secret_values(cfg: Any = None, env: dict[str, str] | None = None) -> set[str]:
    env = os.environ if env is None else env
    names = secret_names(cfg, env)
    out: set[str] = set()
    for name, value in env.items():
        if name in names and len(value) >= MIN_LEN:
            out.add(value)
        try:
            pw = urlsplit(value).password if "://" in value else None
        except ValueError:
            pw = None
        if pw:  # the URI itself; its password alone when long enough not to be a common word ("airflow")
            out.add(value)
            out |= {p for p in (pw, unquote(pw)) if len(p) >= MIN_URI_PASSWORD}
    return out


def redact_text(text: str, values: set[str]) -> str:
    for v in sorted(values, key=len, reverse=True):
        if v in text:
            text = text.replace(v, MASK)
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def redact(obj: Any, values: set[str] | None = None) -> Any:
    """obj with every secret value masked in every string (keys included), recursively."""
    values = secret_values() if values is None else values
    if isinstance(obj, str):
        return redact_text(obj, values)
    if isinstance(obj, dict):
        return {redact(k, values): redact(v, values) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, values) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter masking secret values in every record (the message with its arguments)."""

    def __init__(self, cfg: Any = None):
        super().__init__()
        self.cfg = cfg

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg, secret_values(self.cfg))
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_filter(cfg: Any = None) -> None:
    """Mask secrets in every line the root logger's handlers write (the CLI's logs, a pod's logs)."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter(cfg))
