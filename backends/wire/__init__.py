"""The OpenAI wire protocol that both servers speak — the gateway (relay/) and the worker (backends/): request
schemas and their validation (with structural limits on JSON), the error shape and its handlers, response and
chunk builders, SSE framing and the streaming response, and the body limit. It imports neither server, and
nothing heavier than FastAPI, pydantic, orjson and RE2, so a GPU box that only runs the worker installs no
gateway dependency for it."""
