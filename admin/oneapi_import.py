"""`policy-relay import-oneapi`: channels from a ONE API database (SQLite, MySQL or PostgreSQL) become
policy-relay channels. Dry run by default: it prints what it would create."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, Table, create_engine, select
from sqlmodel import Session

from admin import service
from admin.schemas import ChannelCreate
from relay.db import normalise_url
from relay.models import Channel as ChannelRow
from relay.secrets import SecretBox

# ONE API channel types (relay/channeltype) that speak OpenAI's protocol, with their default base URLs.
OPENAI_WIRE = {1: "https://api.openai.com", 2: None, 4: None, 5: None, 6: None, 7: None, 8: None, 9: None,
               10: None, 12: None, 13: None, 20: "https://openrouter.ai/api/v1", 25: "https://api.moonshot.cn",
               28: "https://api.mistral.ai", 29: "https://api.groq.com/openai/v1", 36: "https://api.deepseek.com",
               39: "https://api.together.xyz", 44: "https://api.siliconflow.cn", 45: "https://api.x.ai",
               50: None}
# Types litellm speaks natively: litellm provider prefix.
LITELLM_PROVIDERS = {3: "azure", 14: "anthropic", 24: "gemini", 30: "ollama", 35: "cohere"}
STATUS = {1: "enabled", 2: "disabled", 3: "auto_disabled"}


@dataclass
class Planned:
    source_id: int
    name: str
    action: str  # create | skip
    reason: str = ""
    body: dict[str, Any] = field(default_factory=dict)


def _mapping(raw: Any) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def plan(row: dict[str, Any], taken: set[str]) -> Planned:
    kind = int(row.get("type") or 0)
    name = (row.get("name") or f"oneapi-{row['id']}").strip()
    if name in taken:
        name = f"{name}-oneapi-{row['id']}"
    models = [m.strip() for m in (row.get("models") or "").split(",") if m.strip()]
    if not models:
        return Planned(row["id"], name, "skip", "no models")
    mapping = _mapping(row.get("model_mapping"))
    base_url = (row.get("base_url") or "").strip() or None
    key = (row.get("key") or "").strip().splitlines()[0] if (row.get("key") or "").strip() else None
    if kind in OPENAI_WIRE:
        body: dict[str, Any] = {"type": "openai", "base_url": base_url or OPENAI_WIRE[kind]}
        if body["base_url"] is None:
            return Planned(row["id"], name, "skip", f"type {kind} needs a base_url")
    elif kind in LITELLM_PROVIDERS:
        provider = LITELLM_PROVIDERS[kind]
        mapping = {m: f"{provider}/{mapping.get(m, m)}" for m in models}
        body = {"type": "litellm", "base_url": base_url}
        config = _mapping(row.get("config")) or _mapping(row.get("other"))
        if kind == 3 and config.get("api_version"):
            body["options"] = {"api_version": config["api_version"]}
    else:
        return Planned(row["id"], name, "skip", f"ONE API channel type {kind} is not supported")
    body.update(name=name, api_key=key, models=models, model_mapping=mapping,
                priority=int(row.get("priority") or 0), weight=max(int(row.get("weight") or 0), 1),
                status=STATUS.get(int(row.get("status") or 1), "disabled"))  # auto_disabled is kept as such
    try:
        ChannelCreate.model_validate({k: v for k, v in body.items() if v is not None})
    except ValueError as exc:
        return Planned(row["id"], name, "skip", f"invalid: {str(exc).splitlines()[0]}")
    return Planned(row["id"], name, "create", body=body)


def read_channels(url: str) -> list[dict[str, Any]]:
    url = normalise_url(url)
    if url.startswith("mysql://"):
        url = "mysql+pymysql://" + url[len("mysql://"):]  # needs `pip install pymysql`
    engine = create_engine(url)
    try:
        table = Table("channels", MetaData(), autoload_with=engine)
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
    finally:
        engine.dispose()


def run(source_url: str, target_engine, apply: bool, box: SecretBox) -> list[Planned]:
    rows = read_channels(source_url)
    with Session(target_engine) as s:
        taken = {n for (n,) in s.execute(select(ChannelRow.name))}
        planned = []
        for row in rows:
            item = plan(row, taken)
            planned.append(item)
            if item.action == "create":
                taken.add(item.name)
        if apply:
            for item in planned:
                if item.action == "create":
                    body = ChannelCreate.model_validate({k: v for k, v in item.body.items() if v is not None})
                    service.create_channel(s, body, "import", box)
    return planned


def table(planned: list[Planned]) -> str:
    lines = [f"{'src':>4}  {'action':<7} {'name':<28} {'type':<8} {'prio':>4} {'wt':>3} {'status':<13} models / reason"]
    for p in planned:
        b = p.body
        detail = ", ".join(b.get("models", [])) if p.action == "create" else p.reason
        lines.append(f"{p.source_id:>4}  {p.action:<7} {p.name[:28]:<28} {b.get('type', '-'):<8} "
                     f"{b.get('priority', ''):>4} {b.get('weight', ''):>3} {b.get('status', '-'):<13} {detail}")
    return "\n".join(lines)
