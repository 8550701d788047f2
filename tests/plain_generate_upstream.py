"""An OpenAI-compatible upstream that does what a naive deployment does: plain transformers
`model.generate(do_sample=True, temperature=<as sent>)`. It really fails the way reference article 000
describes (temperature 0 raises ValueError, 1e-40 raises "probability tensor contains either inf, nan or
element < 0"), answering those requests with a 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import torch

from backends.loading import LoadedModel
from backends.wire import responses as wire
from tests.fake_upstream import read_body, send_json


class PlainGenerateUpstream:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.bodies: list[dict[str, Any]] = []

    def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        tok = self.lm.tokenizer
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        kwargs: dict[str, Any] = {"do_sample": True, "max_new_tokens": body.get("max_tokens") or 8}
        for param in ("temperature", "top_p", "top_k"):
            if body.get(param) is not None:
                kwargs[param] = body[param]
        torch.manual_seed(0)
        with torch.no_grad():
            out = self.lm.model.generate(**ids, **kwargs, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        choice = {"index": 0, "finish_reason": "length",
                  "message": {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)}}
        return wire.response(wire.head(True, body["model"]), True, [choice],
                             wire.usage(int(ids["input_ids"].shape[1]), int(new.shape[0])))

    async def __call__(self, scope, receive, send) -> None:
        raw = await read_body(scope, receive, send)
        if raw is None:
            return
        body = json.loads(raw)
        self.bodies.append(body)
        try:
            status, payload = 200, await asyncio.to_thread(self._generate, body)
        except Exception as exc:  # what a naive server does: the sampler's error becomes a 500
            status, payload = 500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}}
        await send_json(send, status, payload)
