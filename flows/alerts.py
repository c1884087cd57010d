"""Alerts as code: the Prefect automations that call someone when a night needs a person.

    gender-pipeline alerts --webhook-url https://hooks.example/… [--finish-within 4h]

creates (or replaces) three automations on the Prefect server, each posting JSON to the
webhook (a Webhook block, `gender-pipeline-alerts`):

- a night failed or crashed (its final state Failed, Crashed or TimedOut);
- a night ended in Warnings (a listing guard, a photo limit, an alarm);
- a night has not finished `finish_within` after it was due: the window opens when the
  run goes Pending (a runner picked it up) or Late (nobody did, 15 s past its scheduled
  time) and closes at any final state, so a night that failed early is reported once,
  by the first automation, and a stuck or never-started one by this one.

Each alert's body names the alert, the reason in one line, and the flow run (id, name,
state, message, and its page when the server knows its UI's URL):

    {"alert": "gender-pipeline: a night failed", "reason": "the night failed: ListingLooksWrong: …",
     "flow_run": {"id": "…", "name": "2026-11-29 uploads → lake", "state": "Failed", "message": "…",
                  "url": "http://…/runs/flow-run/…"}}

Automations are matched by name (`gender-pipeline: …`): running the command again
replaces them, `remove_alerts` deletes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from prefect.automations import Automation, CallWebhook, EventTrigger, Posture
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client

NIGHTLY_FLOW = "nightly-scoring"
PREFIX = "gender-pipeline: "
WEBHOOK_BLOCK = "gender-pipeline-alerts"
FINISH_WITHIN = timedelta(hours=4)  # a 02:00 night is due by 06:00
FAILED = ("Failed", "Crashed", "TimedOut")  # state names of the FAILED and CRASHED types a flow run ends in
FINAL = ("Completed", "Warnings", "Cancelled", *FAILED)


@dataclass(frozen=True)
class Alert:
    name: str
    description: str
    reason: str  # a Jinja template, rendered by the server when the alert fires
    trigger: EventTrigger


def _span(within: timedelta) -> str:
    seconds = int(within.total_seconds())
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _events(names: tuple[str, ...]) -> set[str]:
    return {f"prefect.flow-run.{name}" for name in names}


def nightly_alerts(finish_within: timedelta = FINISH_WITHIN, flow: str = NIGHTLY_FLOW) -> list[Alert]:
    """The three alerts of the nightly flow (every run of `flow` on the server, from a
    deployment or the CLI)."""
    runs = {"match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": flow}}
    return [
        Alert(f"{PREFIX}a night failed", f"A run of {flow} ended Failed, Crashed or TimedOut.",
              "the night {{ flow_run.state.name | lower }}: {{ flow_run.state.message }}",
              EventTrigger(expect=_events(FAILED), posture=Posture.Reactive, threshold=1, within=timedelta(0),
                           **runs)),
        Alert(f"{PREFIX}a night ended in Warnings", f"A run of {flow} did its work and warned (a listing guard, a "
              f"photo limit, an alarm).",
              "the night ended in Warnings: {{ flow_run.state.message }}",
              EventTrigger(expect=_events(("Warnings",)), posture=Posture.Reactive, threshold=1,
                           within=timedelta(0), **runs)),
        Alert(f"{PREFIX}a night not finished {_span(finish_within)} after it was due",
              f"A run of {flow} had no final state {_span(finish_within)} after it went Pending or Late.",
              f"the night has not finished {_span(finish_within)} after it was due; it is "
              "{{ flow_run.state.name }}",
              EventTrigger(after=_events(("Pending", "Late")), expect=_events(FINAL), for_each={"prefect.resource.id"},
                           posture=Posture.Proactive, threshold=1, within=finish_within, **runs)),
    ]


def payload(alert: Alert) -> str:
    """The JSON body the webhook receives: a template the server renders when it fires."""
    return ("{% set reason %}" + alert.reason + "{% endset %}"
            '{"alert": {{ automation.name | tojson }}, "reason": {{ reason | trim | tojson }}, '
            '"flow_run": {"id": {{ flow_run.id | string | tojson }}, "name": {{ flow_run.name | tojson }}, '
            '"state": {{ flow_run.state.name | tojson }}, "message": {{ (flow_run.state.message or "") | tojson }}, '
            '"url": {{ ((flow_run | ui_url) or "") | tojson }}}}')


def install_alerts(webhook_url: str, finish_within: timedelta = FINISH_WITHIN, flow: str = NIGHTLY_FLOW,
                   headers: dict[str, str] | None = None) -> list[Automation]:
    """Save the webhook as a block and create the alerts, replacing earlier ones of the
    same names (so the command can be run again with another URL or window)."""
    block = Webhook(url=webhook_url, method="POST", headers={"Content-Type": "application/json", **(headers or {})})
    block_id = block.save(WEBHOOK_BLOCK, overwrite=True)
    remove_alerts()
    created = []
    for alert in nightly_alerts(finish_within, flow):
        automation = Automation(name=alert.name, description=alert.description, enabled=True, trigger=alert.trigger,
                                actions=[CallWebhook(block_document_id=block_id, payload=payload(alert))])
        created.append(automation.create())
    return created


def remove_alerts() -> list[str]:
    """Delete every automation this module created (by name); returns their names."""
    with get_client(sync_client=True) as client:
        ours = [a for a in client.read_automations() if a.name.startswith(PREFIX)]
        for automation in ours:
            client.delete_automation(automation.id)
    return [a.name for a in ours]


def listed_alerts() -> list[Automation]:
    with get_client(sync_client=True) as client:
        return [a for a in client.read_automations() if a.name.startswith(PREFIX)]
