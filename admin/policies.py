"""/admin/policies — per-model sampling policies, the shipped presets, and explain."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, select

from admin import service
from admin.crud import Paging, get_or_404
from admin.deps import FilterId, JSONLimitedRoute, RowId, announce, db_session, require_admin
from admin.schemas import INT32_MAX, PolicyCreate, PolicyUpdate
from backends.wire.requests import ChatRequest, CompletionRequest, EmbeddingRequest, check_body, parse_body
from relay.dialects import messages, responses
from relay.errors import APIError, bad_request
from relay.models import ModelPolicy
from relay.policy import apply_policy
from relay.policy_rules import PRESETS, Rules

router = APIRouter(prefix="/admin/policies", tags=["policies"], route_class=JSONLimitedRoute)


class PolicyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    model_pattern: str
    tenant_id: int | None
    priority: int
    rules: dict[str, Any]
    enabled: bool
    version: int


class ExplainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request: dict[str, Any]  # a body of any endpoint
    tenant_id: int | None = Field(default=None, ge=1, le=INT32_MAX)
    task: str | None = None  # as the X-Relay-Task header would give it
    endpoint: Literal["chat", "completions", "embeddings", "responses", "messages"] | None = None  # None: by shape


_SCHEMAS = {"chat": ChatRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest,
            "responses": responses.ResponsesRequest, "messages": messages.MessagesRequest}


def _shape(request: dict[str, Any]) -> str:
    """Which API a body speaks: `input` is the Responses API's (embeddings are only ever named), `prompt`
    completions', and `messages` Anthropic's when it has Anthropic's own fields, else chat's."""
    if "input" in request:
        return "responses"
    if "prompt" in request:
        return "completions"
    if "system" in request or "stop_sequences" in request:
        return "messages"
    return "chat"


def normalised(endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """The body validated as its endpoint does, and as the policies see it (another API's shape translated)."""
    body = parse_body(orjson.dumps(request), _SCHEMAS[endpoint])
    if endpoint == "responses":
        return check_body(responses.to_chat(body), ChatRequest, "after translation to chat")
    if endpoint == "messages":
        return check_body(messages.to_chat(body)[0], ChatRequest, "after translation to chat")
    return body


@router.get("/presets")
def presets(_: str = Depends(require_admin)) -> dict[str, Any]:
    return {name: Rules.model_validate(rules).model_dump(exclude_none=True) for name, rules in PRESETS.items()}


@router.post("/explain")
def explain(body: ExplainBody, request: Request, _: str = Depends(require_admin)) -> dict[str, Any]:
    """What the relay would do with this request right now: matched policy, rewrites, final request."""
    if not isinstance(body.request.get("model"), str):
        raise bad_request("request.model must be a string.", "request.model")
    endpoint = body.endpoint or _shape(body.request)
    try:
        seen = normalised(endpoint, body.request)
    except APIError as exc:
        raise bad_request(f"request ({endpoint}): {exc.message}", f"request.{exc.param}" if exc.param else "request",
                          exc.code) from None
    outcome = apply_policy(request.app.state.catalog.snapshot.policy_index, seen, body.tenant_id, body.task,
                           "embeddings" if endpoint == "embeddings" else "chat")
    return {"endpoint": endpoint, "policy": outcome.ref, "task": outcome.task, "rewrites": outcome.rewrites,
            "notes": outcome.notes, "normalised": seen, "request": outcome.request}


@router.post("", status_code=201, response_model=PolicyOut)
def create_policy(body: PolicyCreate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> ModelPolicy:
    policy = service.create_policy(s, body, actor)
    announce(request)
    return policy


@router.get("", response_model=list[PolicyOut])
def list_policies(request: Request, response: Response, tenant_id: FilterId = None, enabled: bool | None = None,
                  paging: Paging = Depends(), s: Session = Depends(db_session),
                  _: str = Depends(require_admin)) -> list[ModelPolicy]:
    """`?tenant_id=&enabled=&q=` (q: in the model pattern), paged (admin.crud.Paging)."""
    return paging.rows(s, select(ModelPolicy), ModelPolicy, ModelPolicy.model_pattern, request, response,
                       ((ModelPolicy.tenant_id, tenant_id), (ModelPolicy.enabled, enabled)))


@router.get("/{policy_id}", response_model=PolicyOut)
def get_policy(policy_id: RowId, s: Session = Depends(db_session), _: str = Depends(require_admin)) -> ModelPolicy:
    return get_or_404(s, ModelPolicy, policy_id, "policy")


@router.patch("/{policy_id}", response_model=PolicyOut)
def update_policy(policy_id: RowId, body: PolicyUpdate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> ModelPolicy:
    policy = service.update_policy(s, policy_id, body, actor)
    announce(request)
    return policy


@router.delete("/{policy_id}", status_code=204)
def delete_policy(policy_id: RowId, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> None:
    service.delete_policy(s, policy_id, actor)
    announce(request)
