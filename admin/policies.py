"""/admin/policies — per-model sampling policies, the shipped presets, and explain."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlmodel import Session, select

from admin import service
from admin.crud import get_or_404
from admin.deps import RowId, announce, db_session, require_admin
from admin.schemas import INT32_MAX, Int32, ModelName, RowRef, _Patch
from relay.errors import bad_request
from relay.models import ModelPolicy
from relay.policy import apply_policy
from relay.policy_rules import PRESETS, Rules

router = APIRouter(prefix="/admin/policies", tags=["policies"])

PresetName = Literal[tuple(PRESETS)]  # named once, in relay.policy_rules


class PolicyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_pattern: ModelName
    tenant_id: RowRef | None = None
    priority: Int32 = 0
    rules: Rules | None = None
    preset: PresetName | None = None
    enabled: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> PolicyCreate:
        if (self.rules is None) == (self.preset is None):
            raise ValueError("give exactly one of `rules` and `preset`")
        return self


class PolicyUpdate(_Patch):
    nullable = frozenset({"tenant_id"})
    model_pattern: ModelName | None = None
    tenant_id: RowRef | None = None
    priority: Int32 | None = None
    rules: Rules | None = None
    preset: PresetName | None = None
    enabled: bool | None = None


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
    request: dict[str, Any]  # a chat completions body
    tenant_id: int | None = Field(default=None, ge=1, le=INT32_MAX)
    task: str | None = None  # as the X-Relay-Task header would give it


def _stored(rules: Rules | None, preset: str | None) -> dict[str, Any]:
    return (rules or Rules.model_validate(PRESETS[preset or ""])).model_dump(exclude_none=True)


@router.get("/presets")
def presets(_: str = Depends(require_admin)) -> dict[str, Any]:
    return {name: Rules.model_validate(rules).model_dump(exclude_none=True) for name, rules in PRESETS.items()}


@router.post("/explain")
def explain(body: ExplainBody, request: Request, _: str = Depends(require_admin)) -> dict[str, Any]:
    """What the relay would do with this request right now: matched policy, rewrites, final request."""
    if not isinstance(body.request.get("model"), str):
        raise bad_request("request.model must be a string.", "request.model")
    outcome = apply_policy(request.app.state.catalog.snapshot.policies, body.request, body.tenant_id, body.task)
    return {"policy": outcome.ref, "task": outcome.task, "rewrites": outcome.rewrites, "notes": outcome.notes,
            "request": outcome.request}


@router.post("", status_code=201, response_model=PolicyOut)
def create_policy(body: PolicyCreate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> ModelPolicy:
    policy = service.create_policy(s, {"model_pattern": body.model_pattern, "tenant_id": body.tenant_id,
                                       "priority": body.priority, "rules": _stored(body.rules, body.preset),
                                       "enabled": body.enabled}, actor)
    announce(request)
    return policy


@router.get("", response_model=list[PolicyOut])
def list_policies(s: Session = Depends(db_session), _: str = Depends(require_admin)) -> list[ModelPolicy]:
    return list(s.exec(select(ModelPolicy).order_by(ModelPolicy.id)).all())


@router.get("/{policy_id}", response_model=PolicyOut)
def get_policy(policy_id: RowId, s: Session = Depends(db_session), _: str = Depends(require_admin)) -> ModelPolicy:
    return get_or_404(s, ModelPolicy, policy_id, "policy")


@router.patch("/{policy_id}", response_model=PolicyOut)
def update_policy(policy_id: RowId, body: PolicyUpdate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> ModelPolicy:
    changes = body.model_dump(exclude_unset=True, exclude={"rules", "preset"})
    if body.rules is not None or body.preset is not None:
        if body.rules is not None and body.preset is not None:
            raise bad_request("Give at most one of `rules` and `preset`.", "rules")
        changes["rules"] = _stored(body.rules, body.preset)
    policy = service.update_policy(s, policy_id, changes, actor)
    announce(request)
    return policy


@router.delete("/{policy_id}", status_code=204)
def delete_policy(policy_id: RowId, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> None:
    service.delete_policy(s, policy_id, actor)
    announce(request)
