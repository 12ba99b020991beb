"""The daemon's control commands: what ``voxgatectl`` can ask and do.

Each handler takes the request's ``args`` and returns a JSON-able result, or
raises :class:`~voxgate.control.server.CommandError` when the daemon says no.
The shapes of ``status`` (``state``, ``sessions.active/queued/by_tenant``,
``limits``, ``health``) are read by outside tools: keep their names.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from voxgate.control.devices import devices_command
from voxgate.control.protocol import RELOAD_FAILED, plural
from voxgate.control.server import CommandError, Handler
from voxgate.errors import LocalProtocolError
from voxgate.metrics import exposition

if TYPE_CHECKING:
    from voxgate.supervisor import Supervisor

NOT_FOUND = "not-found"
BAD_ARGS = "bad-args"
STOPPING = "stopping"
UNAVAILABLE = "unavailable"
REFUSED = "refused"
MAX_CALLS_LISTED = 1000


def make_handlers(sup: Supervisor) -> dict[str, Handler]:
    """The command table for ``sup``'s control server."""

    def session_id(args: Mapping[str, Any]) -> str:
        value = args.get("id")
        if not isinstance(value, str) or not value:
            raise CommandError(BAD_ARGS, "args.id must be a session id (see `sessions`)")
        return value

    def health() -> dict[str, Any]:
        stats = sup.admission.statistics()
        components = {name: {"healthy": h.healthy, "detail": h.detail}
                      for name, h in stats.health.items()}
        components["memory"] = {"healthy": stats.memory_ok, "detail": stats.memory_detail}
        for name, service in (("records", sup.records), ("postcall", sup.postcall)):
            if service is not None:  # never gates admission: calls go on without them
                components[name] = {"healthy": service.healthy,
                                    "detail": service.last_error or ""}
        webhooks = sup.webhooks
        if webhooks is not None:  # never gates admission either: the menu answers
            healthy, detail = webhooks.verdict()
            components["webhook"] = {"healthy": healthy, "detail": detail}
        return {"healthy": all(c["healthy"] for c in components.values()),
                "components": components}

    async def status(args: Mapping[str, Any]) -> dict[str, Any]:
        stats = sup.admission.statistics()
        limits = sup.admission.limits
        admitting, why = sup.admission.availability()
        return {
            "state": sup.state,
            "admitting": admitting,
            "not_admitting_because": why,
            "sessions": {
                "active": stats.active,
                "queued": stats.queued,
                "by_tenant": {name: {"active": t.active, "queued": t.queued,
                                     "max_sessions": t.max_sessions}
                              for name, t in stats.by_tenant.items()},
            },
            "limits": {
                "max_sessions": limits.max_sessions,
                "queue_size": limits.queue_size,
                "queue_timeout_s": limits.queue_timeout_s,
                "retry_after_s": limits.retry_after_s,
                "default_tenant_max_sessions": limits.default_tenant_max_sessions,
                "drain_timeout_s": sup.config.limits.drain_timeout_s,
            },
            "health": health(),
            "sip": {"dialogs": sup.endpoint.core.active_dialogs,
                    "transactions": sup.endpoint.core.active_transactions},
            "admission": {"counters": [
                {"result": r, "reason": why_, "tenant": t, "count": n}
                for (r, why_, t), n in sorted(stats.counters.items())
            ]},
            "config": sup.config.source,
        }

    async def sessions(args: Mapping[str, Any]) -> list[dict[str, object]]:
        return sup.registry.sessions()

    async def show(args: Mapping[str, Any]) -> dict[str, object]:
        key = session_id(args)
        info = sup.registry.describe(key, sup.config.budget.session_bytes)
        record = None if sup.records is None else await sup.records.get_call(key)
        if info is None and record is None:
            raise CommandError(NOT_FOUND, f"no session {key!r} (and no call record)")
        return {**(info or {}), "record": record}

    async def calls(args: Mapping[str, Any]) -> list[dict[str, object]]:
        if sup.records is None:
            raise CommandError(UNAVAILABLE, "call records are off ([records] path is empty)")
        since_s = _number(args, "since_s")
        limit = _number(args, "limit")
        return await sup.records.list_calls(
            since=None if since_s is None else time.time() - since_s,
            tenant=_text(args, "tenant"), reason=_text(args, "reason"),
            limit=MAX_CALLS_LISTED if limit is None else max(1, min(int(limit),
                                                                     MAX_CALLS_LISTED)))

    async def jobs(args: Mapping[str, Any]) -> dict[str, object]:
        if sup.postcall is None:
            raise CommandError(UNAVAILABLE, "post-call jobs are off ([postcall] webhook is empty)")
        return await sup.postcall.summary()

    async def providers(args: Mapping[str, Any]) -> list[dict[str, object]]:
        pools = [pool for pool in (sup.providers, sup.webhooks) if pool is not None]
        if not pools:
            raise CommandError(UNAVAILABLE, "no [[agent.providers]] or [agent.webhook] URLs "
                                            "configured")
        return [row for pool in pools for row in pool.snapshot()]

    async def registrations(args: Mapping[str, Any]) -> list[dict[str, object]]:
        statuses = sup.endpoint.registration_statuses()
        if not statuses:
            raise CommandError(UNAVAILABLE, "no [[sip.registrations]] configured")
        return [dataclasses.asdict(status) for status in statuses]

    async def hangup(args: Mapping[str, Any]) -> dict[str, str]:
        sid = session_id(args)
        if not sup.registry.hangup(sid):
            raise CommandError(NOT_FOUND, f"no session {sid!r}")
        return {"message": f"session {sid} ending (reason operator)"}

    async def transfer(args: Mapping[str, Any]) -> dict[str, str]:
        sid = session_id(args)
        target = _text(args, "target")
        if not target:
            raise CommandError(BAD_ARGS, "args.target must be a SIP URI")
        try:
            sup.endpoint.transfer(sid, target)
        except LookupError:
            raise CommandError(NOT_FOUND, f"no SIP call with session {sid!r}") from None
        except LocalProtocolError as e:
            raise CommandError(BAD_ARGS, f"transfer refused: {e}") from None
        return {"message": f"session {sid}: REFER sent to {target}; the call ends with "
                           f"reason transferred once the transferee reports success"}

    async def call(args: Mapping[str, Any]) -> dict[str, str]:
        from voxgate.transports.sip_endpoint import OutboundRefused

        target = _text(args, "uri")
        tenant = _text(args, "tenant")
        agent = _text(args, "agent")
        if not target:
            raise CommandError(BAD_ARGS, "args.uri must be a SIP URI (sip:user@IP[:port])")
        if tenant is not None and tenant != "default" and tenant not in {
                t.name for t in sup.admission.limits.tenants}:
            raise CommandError(BAD_ARGS, f"no tenant {tenant!r} configured")
        try:
            sid = sup.endpoint.place_call(target, tenant=tenant, agent=agent)
        except ValueError as e:
            raise CommandError(BAD_ARGS, str(e)) from None
        except OutboundRefused as e:
            raise CommandError(REFUSED, f"call refused: {e.refusal.reason}") from None
        return {"id": sid, "message": f"session {sid}: calling {target}"}

    async def drain(args: Mapping[str, Any]) -> dict[str, str]:
        sup.drain()
        return {"message": f"draining: admission closed, "
                           f"{plural(len(sup.registry), 'session')} in progress"}

    async def resume(args: Mapping[str, Any]) -> dict[str, str]:
        if sup.stopping:
            raise CommandError(STOPPING, "the daemon is stopping; it cannot resume")
        sup.resume()
        return {"message": "admitting calls again"}

    async def reload(args: Mapping[str, Any]) -> dict[str, str]:
        from voxgate.supervisor import ReloadFailed

        try:
            return {"message": sup.reload()}
        except ReloadFailed as e:
            raise CommandError(RELOAD_FAILED, f"old config kept: {e}") from e

    async def health_cmd(args: Mapping[str, Any]) -> dict[str, Any]:
        return health()

    async def metrics(args: Mapping[str, Any]) -> dict[str, str]:
        await sup.refresh_metrics()
        return {"text": exposition()}

    return {
        "status": status, "sessions": sessions, "show": show, "calls": calls, "jobs": jobs,
        "providers": providers, "registrations": registrations, "hangup": hangup,
        "transfer": transfer, "call": call,
        "drain": drain, "resume": resume, "reload": reload, "health": health_cmd,
        "metrics": metrics, "devices": devices_command, "line": sup.alsa.line_command,
    }


def _number(args: Mapping[str, Any], key: str) -> float | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise CommandError(BAD_ARGS, f"args.{key} must be a number >= 0")
    return float(value)


def _text(args: Mapping[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is not None and not isinstance(value, str):
        raise CommandError(BAD_ARGS, f"args.{key} must be a string")
    return value
