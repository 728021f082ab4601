"""HTTP routes of the hub: publish API, subscribe tokens, disconnect command, health,
metrics. Transports (``/ws``, ``/sse``) are mounted as raw ASGI routes in app.py."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from . import errors
from .auth import Principal, bearer_credential
from .broker import BrokerUnavailable, PublishRequest
from .errors import HubError
from .http_errors import OrjsonResponse, error_responses
from .hub import Hub
from .policy import check_publish, validate_channel
from .protocol import encode_data, parse_offset, validate_event_name
from .ratelimit import enforce


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


HubDep = Annotated[Hub, Depends(get_hub)]


async def get_principal(request: Request, hub: HubDep) -> Principal:
    credential = bearer_credential(request.headers.get("authorization"))
    if credential is None:
        raise HubError(errors.UNAUTHORIZED, "send 'Authorization: Bearer <token or API key>'")
    return await hub.authenticator.authenticate(credential)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


class PublishIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"channel": "user:42", "event": "order.shipped", "data": {"id": 7}}]
        },
    )

    channel: str = Field(min_length=1, max_length=128)
    event: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")
    data: JsonValue = None


class PublishBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[PublishIn] = Field(min_length=1)


class PublishOut(BaseModel):
    channel: str
    offset: str = Field(description="opaque '<offset>:<epoch>' token, usable as 'since'")
    seq: int = Field(description="the offset's number, growing by one per message")
    epoch: str
    ts: int = Field(description="publish time, milliseconds since the Unix epoch")


class PublishBatchOut(BaseModel):
    results: list[PublishOut]


class SubscribeTokenOut(BaseModel):
    token: str
    expires_in: int
    token_type: str = "subscribe"


class DisconnectOut(BaseModel):
    user: str
    revoked: bool


router = APIRouter()


async def _rate_limit(hub: Hub, principal: Principal, response: Response) -> None:
    settings = hub.settings
    headers = await enforce(
        hub.broker,
        f"publish:{principal.kind}:{principal.subject}",
        rate=settings.publish_rate_per_second,
        burst=settings.publish_rate_burst,
    )
    response.headers.update(headers)
    response.headers["X-Herald-Node"] = hub.node_id


def _request_for(principal: Principal, hub: Hub, message: PublishIn) -> PublishRequest:
    channel = check_publish(hub.policy, principal, message.channel)
    return PublishRequest(channel, validate_event_name(message.event), encode_data(message.data))


def _out(pub: Any) -> PublishOut:
    return PublishOut(
        channel=pub.channel,
        offset=pub.position.token(),
        seq=pub.offset,
        epoch=pub.epoch,
        ts=pub.ts,
    )


@router.post(
    "/api/v1/publish",
    response_model=PublishOut,
    tags=["publish"],
    summary="Publish one message (services: API key with the publish scope)",
    responses=error_responses(401, 403, 413, 429),
)
async def publish(
    message: PublishIn, hub: HubDep, principal: PrincipalDep, response: Response
) -> PublishOut:
    await _rate_limit(hub, principal, response)
    request = _request_for(principal, hub, message)
    pub = await hub.publish_encoded(request.channel, request.event, request.data)
    return _out(pub)


@router.post(
    "/api/v1/publish/batch",
    response_model=PublishBatchOut,
    tags=["publish"],
    summary="Publish many messages in one round trip, in order",
    responses=error_responses(401, 403, 413, 429),
)
async def publish_batch(
    body: PublishBatchIn, hub: HubDep, principal: PrincipalDep, response: Response
) -> PublishBatchOut:
    limit = hub.settings.max_batch_messages
    if len(body.messages) > limit:
        raise HubError(errors.BAD_REQUEST, f"at most {limit} messages per batch")
    await _rate_limit(hub, principal, response)
    requests = [_request_for(principal, hub, message) for message in body.messages]
    pubs = await hub.publish_requests(requests)
    return PublishBatchOut(results=[_out(pub) for pub in pubs])


@router.post(
    "/api/v1/tokens/subscribe",
    response_model=SubscribeTokenOut,
    tags=["auth"],
    summary="A short-lived token for EventSource's ?token= (browsers cannot send headers)",
    responses=error_responses(401, 403),
)
async def subscribe_token(hub: HubDep, principal: PrincipalDep) -> SubscribeTokenOut:
    if principal.kind != "user":
        raise HubError(errors.FORBIDDEN, "subscribe tokens are issued for user tokens only")
    ttl = hub.settings.subscribe_token_ttl
    # The stream may live as long as the access token it came from, not just the ttl.
    session_exp = principal.expires_at or (time.time() + hub.settings.access_token_ttl)
    token = hub.authenticator.tokens.issue(
        principal.subject,
        role=principal.role,
        channels=list(principal.channels),
        ttl=ttl,
        token_type="subscribe",
        extra={"session_exp": int(session_exp)},
    )
    return SubscribeTokenOut(token=token, expires_in=ttl)


@router.post(
    "/api/v1/connections/users/{user_id}/disconnect",
    response_model=DisconnectOut,
    tags=["admin"],
    summary="Close every live connection of a user on every worker",
    responses=error_responses(401, 403),
)
async def disconnect_user(
    user_id: str, hub: HubDep, principal: PrincipalDep, revoke: bool = False
) -> DisconnectOut:
    if not principal.is_admin:
        raise HubError(errors.FORBIDDEN, "admin only (admin token or admin-scoped key)")
    if revoke:
        await hub.disconnect_user(user_id, revoke=True)
    else:
        await hub.disconnect_user(user_id, revoke=False, disconnect=errors.FORCE_RECONNECT)
    return DisconnectOut(user=user_id, revoked=revoke)


class HistoryMessage(BaseModel):
    offset: str
    seq: int
    event: str
    data: JsonValue
    ts: int


class HistoryOut(BaseModel):
    channel: str
    offset: str = Field(description="the channel's current top")
    recovered: bool = Field(
        description="false when 'since' is older than history keeps (or from another "
        "epoch): messages were lost, refetch your state"
    )
    messages: list[HistoryMessage]


class PresenceOut(BaseModel):
    channel: str
    connections: int
    users: dict[str, int] = Field(description="user id -> live connection count")


def _may_read(hub: Hub, principal: Principal, channel: str) -> str:
    """Reading a channel's history or presence needs the right to subscribe to it (or a
    service key)."""
    name = validate_channel(channel)
    if not principal.is_service and not hub.policy.can_subscribe(principal, name):
        raise HubError(errors.FORBIDDEN, f"not allowed to read {name!r}")
    return name


@router.get(
    "/api/v1/channels/{channel}/history",
    response_model=HistoryOut,
    tags=["channels"],
    summary="Messages of a channel after an offset (oldest first)",
    responses=error_responses(401, 403),
)
async def history(
    channel: str,
    hub: HubDep,
    principal: PrincipalDep,
    since: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> HistoryOut:
    name = _may_read(hub, principal, channel)
    position = parse_offset(since) if since else None
    try:
        result = await hub.broker.history(name, since=position, limit=limit)
    except BrokerUnavailable:
        raise HubError(errors.UNAVAILABLE, "message broker unavailable", temporary=True) from None
    return HistoryOut(
        channel=name,
        offset=result.position.token(),
        recovered=result.recovered,
        messages=[
            HistoryMessage(
                offset=pub.position.token(),
                seq=pub.offset,
                event=pub.event,
                data=orjson.loads(pub.data),
                ts=pub.ts,
            )
            for pub in result.publications
        ],
    )


@router.get(
    "/api/v1/channels/{channel}/presence",
    response_model=PresenceOut,
    tags=["channels"],
    summary="Who is subscribed to a channel, on every worker",
    responses=error_responses(401, 403),
)
async def presence(channel: str, hub: HubDep, principal: PrincipalDep) -> PresenceOut:
    name = _may_read(hub, principal, channel)
    if not hub.settings.channel_options(name).presence:
        raise HubError(errors.BAD_REQUEST, f"presence is not enabled for {name!r}")
    try:
        snapshot = await hub.presence.snapshot(name)
    except BrokerUnavailable:
        raise HubError(errors.UNAVAILABLE, "message broker unavailable", temporary=True) from None
    return PresenceOut(**snapshot)


class StatsOut(BaseModel):
    connections: dict[str, int] = Field(description="live connections by transport")
    subscriptions: int
    published: int
    delivered: dict[str, int] = Field(description="messages written, by transport")


@router.get(
    "/api/v1/stats",
    response_model=StatsOut,
    tags=["admin"],
    summary="Live counts summed over every worker (admin)",
    responses=error_responses(401, 403),
)
async def stats(hub: HubDep, principal: PrincipalDep) -> StatsOut:
    if not principal.is_admin:
        raise HubError(errors.FORBIDDEN, "admin only (admin token or admin-scoped key)")
    totals = hub.metrics.totals()

    def by_transport(name: str) -> dict[str, int]:
        values = totals.get(name, {})
        return {
            transport: int(values.get(f"transport={transport}", 0))
            for transport in ("websocket", "sse")
        }

    return StatsOut(
        connections=by_transport("herald_connections"),
        subscriptions=int(sum(totals.get("herald_subscriptions", {}).values())),
        published=int(sum(totals.get("herald_messages_published_total", {}).values())),
        delivered=by_transport("herald_messages_delivered_total"),
    )


@router.get("/health", tags=["health"], summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready", tags=["health"], summary="Readiness: broker delivers, deps up")
async def ready(request: Request, hub: HubDep) -> OrjsonResponse:
    checks: dict[str, str] = {}
    healthy = True
    delivering = await hub.broker.check_delivery(1.0)
    checks["broker"] = "ok" if delivering else "failing"
    healthy &= delivering
    for name, check in getattr(request.app.state, "readiness_checks", {}).items():
        try:
            ok = bool(await check())
        except Exception:
            ok = False
        checks[name] = "ok" if ok else "failing"
        healthy &= ok
    if not hub.accepting:
        checks["accepting"] = "draining"
        healthy = False
    return OrjsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status_code=200 if healthy else 503,
    )


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics (all workers)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(hub: HubDep) -> Response:
    return Response(hub.metrics.render(), media_type=hub.metrics.content_type)
