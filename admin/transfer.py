"""GET /admin/export and POST /admin/import — a deployment's channels and policies as one JSON document, in the
shapes GET /admin/channels and GET /admin/policies give (a tenant's policy also names its tenant), so another
deployment can be made the same. Keys are not exported (their secrets exist nowhere); channel secrets appear as
`***` or `has_api_key` and are not imported."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session, select

from admin import bulk
from admin.deps import JSONLimitedRoute, announce, db_session, require_admin, secret_box
from admin.policies import PolicyOut
from admin.schemas import ChannelCreate, ChannelOut, PolicyCreate
from channels.registry import channel_types
from relay.errors import bad_request
from relay.models import Channel, ModelPolicy, Tenant
from relay.secrets import SecretBox

router = APIRouter(prefix="/admin", tags=["import and export"], route_class=JSONLimitedRoute)
FORMAT = "policy-relay/1"


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["policy-relay/1"] = FORMAT
    channels: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    policies: list[dict[str, Any]] = Field(default_factory=list, max_length=100_000)


@router.get("/export")
def export(s: Session = Depends(db_session), _: str = Depends(require_admin)) -> dict[str, Any]:
    """A tenant's policy names its tenant (`tenant_name`): ids differ between deployments, names need not."""
    names = dict(s.exec(select(Tenant.id, Tenant.name)).all())
    return {"format": FORMAT,
            "channels": [ChannelOut.of(c) for c in s.exec(select(Channel).order_by(Channel.id)).all()],
            "policies": [{**PolicyOut.model_validate(p).model_dump(), "tenant_name": names.get(p.tenant_id)}
                         for p in s.exec(select(ModelPolicy).order_by(ModelPolicy.id))]}


def _by_tenant_name(s: Session, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`tenant_name` (as exported) names the tenant in this deployment, whatever its id is here."""
    names = dict(s.exec(select(Tenant.name, Tenant.id)).all())
    out = []
    for i, item in enumerate(items):
        name = item.get("tenant_name")
        if name is not None:
            if not isinstance(name, str) or name not in names:
                raise bad_request(f"policies.{i}: no tenant named {str(name)[:200]!r} here.",
                                  f"policies.{i}.tenant_name")
            item = {**item, "tenant_id": names[name]}
        out.append(item)
    return out


def _overrides(item: dict[str, Any]) -> dict[str, Any]:
    """An exported channel shows the capabilities that apply; only those differing from its type's defaults are
    the operator's overrides (so a later change of the type's defaults still reaches it)."""
    kind, shown = channel_types().get(str(item.get("type"))), item.get("capabilities")
    if kind is None or not isinstance(shown, dict):
        return item
    defaults = kind.default_capabilities.model_dump()
    return {**item, "capabilities": {k: v for k, v in shown.items() if k not in defaults or defaults[k] != v}}


def _parse(schema: type[BaseModel], items: list[dict[str, Any]], where: str) -> list[Any]:
    """Each item as the create schema reads it; the fields only an answer has (id, version, …) are left out."""
    parsed = []
    for i, item in enumerate(items):
        try:
            parsed.append(schema.model_validate({k: v for k, v in item.items() if k in schema.model_fields}))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            path = ".".join(str(p) for p in (where, i, *first["loc"]))
            raise bad_request(f"{path}: {first['msg']}", path) from None
    return parsed


@router.post("/import")
def import_config(body: ImportBody, request: Request, s: Session = Depends(db_session),
                  box: SecretBox = Depends(secret_box), actor: str = Depends(require_admin)) -> dict[str, int]:
    """Channels by name and policies by (model_pattern, tenant_id), created or updated, in one transaction."""
    channels = _parse(ChannelCreate, [_overrides(c) for c in body.channels], "channels")
    policies = _parse(PolicyCreate, _by_tenant_name(s, body.policies), "policies")
    counts = bulk.import_config(s, channels, policies, actor, box)
    announce(request)
    return counts
