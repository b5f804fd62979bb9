"""What the guardian does with a cycle's checks: count failures, drain and undrain, and alert on changes.

A target (node, or the server) is failing in a cycle when one of its checks is FAIL (a repaired check is
healthy; NOT RUN is neither). A node failing `DISPATCH_GUARDIAN_DRAIN_AFTER` cycles in a row is drained
(`dispatch.core.drain.drain(..., by="guardian")`); once healthy again it is undrained, but only if the guardian
drained it: a person's drain is theirs to lift. Alerts go out on a change of state only: a check newly
failing, a node drained, a target recovered; never again for a failure already told.

The counts and the last state told live in `DISPATCH_HOME/guardian/state.json` (embedded) or the Prefect
Variable `dispatch_guardian_state` (team mode), so cycles run by the deployment and by a person agree.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from dispatch.core.drain import drain, drained_nodes, undrain
from dispatch.core.errors import ConfigError
from dispatch.core.results import write_json
from dispatch.core.safeload import load_json
from dispatch.core.settings import DispatchSettings
from dispatch.ops.health import SERVER, Check
from dispatch.prefect.drained import drained_store

logger = logging.getLogger(__name__)

VARIABLE = "dispatch_guardian_state"
ADVISORY_CHECKS = frozenset({"agent_versions"})
"""Checks whose failure is told (once) but never counts towards draining the node."""
BY = "guardian"
_MAX_STATE_CHARS = 4800  # Prefect refuses Variable values whose JSON passes 5000 characters


@dataclass
class Alert:
    """One change of state to tell people about."""

    target: str
    kind: str  # "failure", "drained", "recovered"
    subject: str
    body: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _file(settings: DispatchSettings):
    return settings.home / "guardian" / "state.json"


def load_state(settings: DispatchSettings) -> dict[str, dict]:
    """`{target: {"failures": int, "failing": [check names], "drained": bool}}` (empty when none yet)."""
    if settings.embedded:
        try:
            raw = load_json(_file(settings), max_bytes=1 << 20)
        except ConfigError:
            raw = {}
    else:
        from prefect.variables import Variable

        raw = Variable.get(VARIABLE, default={})
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, dict)}


def save_state(settings: DispatchSettings, state: dict[str, dict]) -> None:
    # only targets with something to remember: a healthy, undrained target is the default
    kept = {k: v for k, v in state.items() if v.get("failures") or v.get("failing") or v.get("drained")}
    if settings.embedded:
        _file(settings).parent.mkdir(parents=True, exist_ok=True)
        write_json(_file(settings), kept)
        return
    from prefect.variables import Variable

    if len(json.dumps(kept)) > _MAX_STATE_CHARS:  # a very sick large cluster: keep the counts, drop the names
        kept = {k: {**v, "failing": v.get("failing", [])[:3]} for k, v in kept.items()}
    Variable.set(VARIABLE, kept, overwrite=True)


def _line(check: Check) -> str:
    fix = check.repair or "none (no safe repair)"
    return f"{check.target}: {check.name} {check.status}: {check.detail}; fix taken: {fix}"


def apply_policy(settings: DispatchSettings, checks: list[Check], drain_after: int,
                 log: logging.Logger | logging.LoggerAdapter = logger) -> tuple[list[Alert], list[str], list[str]]:
    """Update the failure counts from this cycle's checks, drain and undrain, and return the alerts.

    Returns:
        (alerts, nodes drained now, nodes undrained now).
    """
    state = load_state(settings)
    by_target: dict[str, list[Check]] = {}
    for check in checks:
        by_target.setdefault(check.target, []).append(check)
    store = drained_store(settings)
    drained = drained_nodes(store)
    alerts: list[Alert] = []
    drained_now: list[str] = []
    undrained_now: list[str] = []
    for target, target_checks in by_target.items():
        before = state.get(target, {})
        failing = [c for c in target_checks if c.status == "FAIL"]
        names = sorted(c.name for c in failing)
        entry = {"failures": 0, "failing": names, "drained": bool(before.get("drained"))}
        if failing:
            counted = [c for c in failing if c.name not in ADVISORY_CHECKS]
            entry["failures"] = int(before.get("failures", 0)) + 1 if counted else 0
            new = [c for c in failing if c.name not in set(before.get("failing", []))]
            if new:
                alerts.append(Alert(target, "failure", f"[dispatch guardian] {target}: {', '.join(c.name for c in new)}"
                                    " failing", "\n".join(_line(c) for c in new)))
            if (target != SERVER and counted and entry["failures"] >= drain_after and target not in drained
                    and drain(store, target, reason=f"failed {', '.join(names)} {entry['failures']} guardian "
                              f"cycles in a row", by=BY)):
                entry["drained"] = True
                drained_now.append(target)
                alerts.append(Alert(target, "drained", f"[dispatch guardian] {target} drained",
                                    f"{target} drained after {entry['failures']} failing cycles in a row; no new "
                                    "spec is placed on it, running specs finish.\n"
                                    + "\n".join(_line(c) for c in failing)))
        elif before.get("failing") or before.get("drained"):
            note = ""
            info = drained.get(target)
            if info is not None and info.get("by") == BY:
                undrain(store, target)
                undrained_now.append(target)
                note = "; undrained: it takes specs again"
            elif info is not None:
                note = f"; left drained by {info.get('by')} (a person's drain is theirs to lift)"
            entry["drained"] = False
            fixes = [c for c in target_checks if c.status == "REPAIRED"]
            alerts.append(Alert(target, "recovered", f"[dispatch guardian] {target} recovered",
                                f"{target}: every check ok again (was failing: {', '.join(before.get('failing', []))})"
                                f"{note}" + "".join(f"\n{_line(c)}" for c in fixes)))
        state[target] = entry
    save_state(settings, state)
    for alert in alerts:
        log.warning("%s: %s", alert.subject, alert.body.replace("\n", " | "))
    return alerts, drained_now, undrained_now


def send_alerts(settings: DispatchSettings, alerts: list[Alert], block_name: str | None = None,
                ) -> tuple[str, list[str]]:
    """Send each alert through the notification block `block_name` (default `DISPATCH_ALERT_BLOCK`), secrets
    masked.

    Returns:
        (where alerts go, for the report; the errors of alerts that could not be sent).
    """
    name = block_name or settings.alert_block
    if not name:
        return "the log only (DISPATCH_ALERT_BLOCK is not set)", []
    if not alerts:
        return f"notification block {name}", []
    from prefect.blocks.core import Block

    secrets = [s for s in settings.secret_values() if len(s) >= 4]

    def mask(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    import httpx

    errors: list[str] = []
    try:
        block = Block.load(name)
    except (ValueError, OSError, httpx.HTTPError) as exc:  # no such block, or the server failed
        return f"notification block {name}", [f"cannot load the notification block {name}: {mask(str(exc))}"]
    for alert in alerts:
        try:
            block.notify(mask(alert.body), subject=mask(alert.subject))
        except Exception as exc:  # noqa: BLE001 - any block's own failure (HTTP, SMTP, ...) must not stop the cycle
            errors.append(f"{alert.subject}: not sent through {name}: {mask(str(exc))}")
    for error in errors:
        logger.warning("%s", error)
    return f"notification block {name}", errors
