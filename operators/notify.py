"""Failures and alarms notify through Airflow's notifier interface (airflow.sdk BaseNotifier).

The deployment chooses the notifier, never the triggering user:

* BABELSYNTH_NOTIFY_EMAIL="ops@example.com,data@example.com": the SMTP provider's SmtpNotifier (connection
  `smtp_default`), the documented example (docs/nightly.md);
* BABELSYNTH_NOTIFIER="package.module:factory": any notifier of any provider (Slack, Teams, PagerDuty...):
  the factory returns a BaseNotifier or a list of them.

Every task gets them as on_failure_callback (a failed stage, commit, or publish refused by a `fail`
alarm); `warn` alarms call them from the publish task, which does not fail. Nothing is imported unless
configured, so DAG parsing stays light.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

NOTIFIER_ENV = "BABELSYNTH_NOTIFIER"
EMAIL_ENV = "BABELSYNTH_NOTIFY_EMAIL"
SUBJECT = (
    "babelsynth {{ dag.dag_id }} {{ run_id }}: {{ ti.task_id }} {{ babelsynth_event | default('failed') }}"
)
BODY = (
    "<p>{{ babelsynth_message | default(exception) }}</p>"
    "<p>DAG {{ dag.dag_id }}, run {{ run_id }}, task {{ ti.task_id }} (try {{ ti.try_number }}).</p>"
)


def notifiers() -> list[Any]:
    """Fresh notifier objects (a notifier renders its templates in place, so each use gets its own)."""
    out: list[Any] = []
    emails = [a.strip() for a in os.environ.get(EMAIL_ENV, "").split(",") if a.strip()]
    if emails:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        out.append(SmtpNotifier(to=emails, subject=SUBJECT, html_content=BODY))
    spec = os.environ.get(NOTIFIER_ENV, "").strip()
    if spec:
        module, _, attr = spec.partition(":")
        if not attr:
            raise ValueError(f"{NOTIFIER_ENV}={spec!r}: expected 'package.module:factory'")
        made = getattr(importlib.import_module(module), attr)()
        out += list(made) if isinstance(made, list | tuple) else [made]
    return out


def notify(context: Any, event: str, message: str) -> int:
    """Send `message` through every configured notifier (a `warn` alarm); returns how many were called."""
    sent = 0
    for n in notifiers():
        n({**context, "babelsynth_event": event, "babelsynth_message": message})
        sent += 1
    return sent
