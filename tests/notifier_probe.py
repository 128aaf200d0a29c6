"""A minimal notifier for the tests: Airflow's BaseNotifier, its message templated from the task context
like a provider's (SMTP, Slack), appended as a JSON line to the file $BABELSYNTH_PROBE_FILE."""

from __future__ import annotations

import json
import os

from airflow.sdk.bases.notifier import BaseNotifier

EVENT = "{{ babelsynth_event | default('failed') }}"
MESSAGE = "{{ ti.task_id }}|" + EVENT + "|{{ babelsynth_message | default(exception) }}"


class ProbeNotifier(BaseNotifier):
    template_fields = ("message",)

    def __init__(self, message: str = MESSAGE):
        super().__init__()
        self.message = message

    def notify(self, context) -> None:
        with open(os.environ["BABELSYNTH_PROBE_FILE"], "a") as f:
            f.write(json.dumps({"message": self.message, "run_id": context["run_id"]}) + "\n")


def probe() -> ProbeNotifier:
    return ProbeNotifier()
