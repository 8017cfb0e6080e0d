"""The automations `make up` creates on the Prefect server (idempotent).

    .venv/bin/python scripts/automations.py

"Crash zombie flow runs": a flow run whose process died (a killed worker, a lost machine) sends no more
heartbeats; Prefect leaves it Running forever. Each flow run sends one every `[flows] heartbeat_frequency`
seconds (prefect.toml: 30); when none and no final state follows within 90 s, this marks the run Crashed, as
Prefect documents ("detect zombie flows"). A re-run of its deployment then resumes its training run directory.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

ZOMBIE_AUTOMATION = "crash-zombie-flow-runs"
MISSED_HEARTBEATS_S = 90  # three heartbeats of 30 s


def zombie_automation() -> Automation:
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Marks a flow run Crashed when its heartbeats stop (its process died): scripts/automations.py",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {MISSED_HEARTBEATS_S} s: the flow run's process died "
                                            f"(automation {ZOMBIE_AUTOMATION})")])


def ensure_automations() -> None:
    """Create the automation, or bring an existing one of the same name up to date."""
    wanted = zombie_automation()
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # none of that name
        existing = None
    if existing is None:
        wanted.create()
        print(f"automation: {ZOMBIE_AUTOMATION} created")
    else:
        existing.trigger, existing.actions, existing.description = wanted.trigger, wanted.actions, wanted.description
        existing.update()
        print(f"automation: {ZOMBIE_AUTOMATION} up to date")


if __name__ == "__main__":
    ensure_automations()
