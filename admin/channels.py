"""/admin/channels — api_key is write-only: accepted here, stored encrypted, never returned."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from admin import service
from admin.crud import Paging, get_or_404
from admin.deps import JSONLimitedRoute, RowId, announce, db_session, require_admin, secret_box
from admin.probe import probe_and_record
from admin.schemas import ChannelCreate, ChannelOut, ChannelUpdate
from channels.base import UpstreamError
from channels.registry import build
from relay.catalog import channel_config
from relay.models import Channel, utcnow
from relay.secrets import SecretBox

router = APIRouter(prefix="/admin/channels", tags=["channels"], route_class=JSONLimitedRoute)


@router.post("", status_code=201, response_model=ChannelOut)
def create_channel(body: ChannelCreate, request: Request, s: Session = Depends(db_session),
                   box: SecretBox = Depends(secret_box), actor: str = Depends(require_admin)) -> ChannelOut:
    channel = service.create_channel(s, body, actor, box)
    announce(request)
    return ChannelOut.of(channel)


@router.get("", response_model=list[ChannelOut])
def list_channels(request: Request, response: Response,
                  status: Literal["enabled", "disabled", "auto_disabled"] | None = None,
                  type: str | None = Query(None, max_length=50), paging: Paging = Depends(),
                  s: Session = Depends(db_session), _: str = Depends(require_admin)) -> list[ChannelOut]:
    """`?status=&type=&q=` (q: in the name), paged (admin.crud.Paging)."""
    rows = paging.rows(s, select(Channel), Channel, Channel.name, request, response,
                       ((Channel.status, status), (Channel.type, type)))
    return [ChannelOut.of(c) for c in rows]


@router.get("/{channel_id}", response_model=ChannelOut)
def get_channel(channel_id: RowId, s: Session = Depends(db_session),
                _: str = Depends(require_admin)) -> ChannelOut:
    return ChannelOut.of(get_or_404(s, Channel, channel_id, "channel"))


@router.patch("/{channel_id}", response_model=ChannelOut)
def update_channel(channel_id: RowId, body: ChannelUpdate, request: Request, s: Session = Depends(db_session),
                   box: SecretBox = Depends(secret_box), actor: str = Depends(require_admin)) -> ChannelOut:
    channel = service.update_channel(s, channel_id, body, actor, box)
    announce(request)
    return ChannelOut.of(channel)


@router.delete("/{channel_id}", status_code=204)
def delete_channel(channel_id: RowId, request: Request, s: Session = Depends(db_session),
                   actor: str = Depends(require_admin)) -> None:
    service.delete_channel(s, channel_id, actor)
    announce(request)


@router.post("/{channel_id}/test", response_model=ChannelOut)
async def test_channel(channel_id: RowId, request: Request, model: str | None = None,
                       s: Session = Depends(db_session), box: SecretBox = Depends(secret_box),
                       _: str = Depends(require_admin)) -> ChannelOut:
    """Sends new-api's test request ("hi", max_tokens 16) and stores latency and outcome; a channel whose upstream
    refuses chat with a 400 is tried with an embedding of "hi" (an embedding model's channel)."""
    row = await run_in_threadpool(get_or_404, s, Channel, channel_id, "channel")
    config = channel_config(row, box)
    upstream = config.upstream_model(model or config.models[0])
    started = time.perf_counter()
    ok, error = True, None
    try:
        channel = build(config)
        try:
            answer = await channel.chat({"model": upstream, "max_tokens": 16,
                                         "messages": [{"role": "user", "content": "hi"}]})
            content = answer["choices"][0]["message"].get("content")
            good = isinstance(content, str) and "usage" in answer
        except UpstreamError as refused:
            if refused.status != 400:
                raise
            try:
                answer = await channel.embedding({"model": upstream, "input": "hi", "encoding_format": "float"})
            except UpstreamError:
                raise refused from None  # not an embedding model either: the chat error says more
            good = bool(answer.get("data")) and "usage" in answer
        if not good:
            ok, error = False, "answer has no string content (or no embedding) or no usage"
    except UpstreamError as exc:
        ok, error = False, f"{exc.kind}: {exc.message}"
    except Exception as exc:  # a plugin's own bug is a failed test, not a 500
        ok, error = False, f"{type(exc).__name__}: {exc}"
    row.last_test_at = utcnow()
    row.last_test_ok = ok
    row.last_test_latency_ms = round((time.perf_counter() - started) * 1000, 3)
    row.last_test_error = error
    # Not an edit of the configuration: no audit event, no version bump, no reload anywhere.
    s.add(row)
    await run_in_threadpool(s.commit)
    return ChannelOut.of(row)


@router.post("/{channel_id}/probe")
async def probe_channel(channel_id: RowId, request: Request, model: str | None = None, apply: bool = False,
                        s: Session = Depends(db_session), box: SecretBox = Depends(secret_box),
                        actor: str = Depends(require_admin)) -> dict:
    """Sends the parameter probe's grid (admin.probe) straight to this channel, stores the result on the channel,
    and answers the table, the proposed rules and what they make of a temperature-0 request; `apply=true` writes
    the proposal as the policy of each of the channel's models (audited)."""
    answer = await probe_and_record(s, channel_id, box, model, apply, actor, run_in_threadpool)
    if apply:
        announce(request)
    return answer
