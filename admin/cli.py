"""`policy-relay` command line: serve (the gateway, optionally with a local worker), worker, db upgrade, and
the operator's shell commands for tenants, keys and channels — which write through admin.service like the admin
API does (validated, audited with actor `cli`)."""

from __future__ import annotations

import argparse
import json
import sys

from relay.settings import SecretKeyError, Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from relay import metrics_dir
    from relay.settings import PROCESSES_ENV

    os.environ[PROCESSES_ENV] = str(max(1, args.workers))  # each process takes its part of a channel's max_inflight
    try:  # before any gateway process imports prometheus-client's values
        made = metrics_dir.prepare(args.workers)
    except metrics_dir.MetricsDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return _run_gateway(args, settings)
    finally:
        metrics_dir.remove(made)


def _run_gateway(args: argparse.Namespace, settings: Settings) -> int:
    import os

    import uvicorn

    from admin import bootstrap
    from relay import db
    from relay.health import WORKER_ENV
    from relay.request_context import log_config

    db.upgrade(settings.database_url)  # idempotent: a fresh machine gets its schema here
    bootstrap.check_secret_key(settings)  # a wrong key stops here, with its message, not in every worker
    if args.with_worker:
        _, url, model = bootstrap.start_worker(args.with_worker, args.worker_port)
        bootstrap.register_local_channel(settings.database_url, url, model)
        os.environ[WORKER_ENV] = url  # /health/ready also waits for this worker
    elif args.worker_url:
        bootstrap.register_local_channel(settings.database_url, args.worker_url,
                                         bootstrap.wait_for_worker(args.worker_url, 600))
    if sys.platform != "win32":  # relay.event_loop is uvloop's, and RLIMIT_NOFILE POSIX's
        from relay.event_loop import raise_open_files_limit

        raise_open_files_limit()  # inherited by every gateway process of this serve
    secret = bootstrap.first_key(settings.database_url)
    if secret:
        print(f"\nNew database: created tenant 'default' and its first API key (shown this once):\n    {secret}\n",
              flush=True)
    uvicorn.run("admin.app:create_app", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, workers=args.workers, log_level=args.log_level,
                log_config=log_config(os.environ.get("RELAY_LOG_FORMAT", "text"), args.log_level),
                access_log=args.access_log, loop=_EVENT_LOOP, http=_HTTP,
                proxy_headers=bool(settings.trusted_proxies), forwarded_allow_ips=settings.trusted_proxies or None,
                timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)))
    return 0


# uvloop, accepting every pending connection (relay.event_loop); asyncio's own loop where uvloop does not run. And
# uvicorn's httptools protocol, answering a refusal without starting the app (relay.http_protocol)
_EVENT_LOOP = "asyncio" if sys.platform == "win32" else "relay.event_loop:new_event_loop"
_HTTP = "relay.http_protocol:RefusingHttpToolsProtocol"


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from backends.cli import run

    return run(args)


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from relay import db

    if args.db_command == "upgrade":
        db.upgrade(settings.database_url, args.revision)
    print(f"database at revision {db.current_revision(settings.database_url)}")
    return 0


def _write(settings: Settings, write) -> int:
    """Runs one service-layer write with actor `cli`; a refusal is its message on stderr and exit code 1."""
    from relay.db import make_engine, session
    from relay.errors import APIError

    engine = make_engine(settings.database_url)
    try:
        with session(engine) as s:
            print(json.dumps(write(s)))
        return 0
    except APIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _tenant_create(args: argparse.Namespace, settings: Settings) -> int:
    from admin import service
    from admin.schemas import TenantCreate

    def write(s):
        body = service.parsed(TenantCreate, name=args.name, token_quota=args.token_quota, rpm=args.rpm, tpm=args.tpm)
        tenant = service.create_tenant(s, body, "cli")
        return {"id": tenant.id, "name": tenant.name}

    return _write(settings, write)


def _key_create(args: argparse.Namespace, settings: Settings) -> int:
    from admin import service
    from admin.schemas import KeyCreate

    def write(s):
        tenant = service.tenant_by_name_or_id(s, args.tenant)
        models = args.models.split(",") if args.models else None
        body = service.parsed(KeyCreate, tenant_id=tenant.id, name=args.name, models=models)
        key, secret = service.create_key(s, body, "cli")
        return {"id": key.id, "tenant_id": tenant.id, "key": secret}

    return _write(settings, write)


def _key_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from admin import service

    def write(s):
        key = service.revoke_key(s, args.id, "cli")
        return {"id": key.id, "status": key.status}

    return _write(settings, write)


def _channel_probe(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from sqlmodel import select

    from admin.bootstrap import secret_box
    from admin.probe import probe_and_record
    from relay.errors import not_found
    from relay.models import Channel

    async def direct(fn, *a):
        return fn(*a)

    def write(s):
        row = s.exec(select(Channel).where(Channel.name == args.name)).first()
        if row is None:
            raise not_found(f"No channel is named `{args.name}`.", "name", "channel_not_found")
        return asyncio.run(probe_and_record(s, row.id, secret_box(settings), args.model, args.apply, "cli", direct,
                                            close_connections=True))

    return _write(settings, write)


def _channel_add(args: argparse.Namespace, settings: Settings) -> int:
    from admin import service
    from admin.bootstrap import secret_box
    from admin.schemas import ChannelCreate

    def write(s):
        try:
            options, mapping = json.loads(args.options or "{}"), json.loads(args.model_mapping or "{}")
        except ValueError as exc:
            from relay.errors import bad_request

            raise bad_request(f"--options / --model-mapping must be JSON: {exc}") from None
        body = service.parsed(ChannelCreate, name=args.name, type=args.type, base_url=args.base_url,
                              api_key=args.api_key, models=args.models.split(","), options=options,
                              model_mapping=mapping)
        channel = service.create_channel(s, body, "cli", secret_box(settings))
        return {"id": channel.id, "name": channel.name}

    return _write(settings, write)


def _secret_key(args: argparse.Namespace, settings: Settings) -> int:
    from relay.secrets import new_key

    print(new_key())
    return 0


def _import_oneapi(args: argparse.Namespace, settings: Settings) -> int:
    from admin import oneapi_import
    from admin.bootstrap import secret_box
    from relay import db

    db.upgrade(settings.database_url)
    planned = oneapi_import.run(args.database_url, db.make_engine(settings.database_url), apply=args.apply,
                                box=secret_box(settings))
    print(oneapi_import.table(planned))
    created = sum(p.action == "create" for p in planned)
    verb = "created" if args.apply else "would create (dry run; --apply to write)"
    print(f"\n{created} channel(s) {verb}, {len(planned) - created} skipped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policy-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (applies migrations first)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1, help="gateway processes (default 1)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--access-log", action="store_true", help="log every request line")
    serve.add_argument("--with-worker", metavar="MODEL",
                       help="also start a local worker for MODEL (e.g. smollm2-135m) and a `local` channel for it")
    serve.add_argument("--worker-port", type=int, default=8001)
    serve.add_argument("--worker-url", help="register an already running worker as the `local` channel")
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run the local torch/transformers worker (as `python -m backends`)")
    from backends.cli import add_arguments

    add_arguments(worker)
    worker.set_defaults(func=_worker)

    dbp = sub.add_parser("db", help="database schema")
    dbsub = dbp.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="create or upgrade the schema")
    up.add_argument("revision", nargs="?", default="head")
    dbsub.add_parser("current", help="print the schema revision")
    dbp.set_defaults(func=_db)

    tenant = sub.add_parser("tenant", help="tenants").add_subparsers(dest="tenant_command", required=True)
    tc = tenant.add_parser("create")
    tc.add_argument("name")
    tc.add_argument("--token-quota", type=int)
    tc.add_argument("--rpm", type=int)
    tc.add_argument("--tpm", type=int)
    tc.set_defaults(func=_tenant_create)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    kc = key.add_parser("create", help="create a key and print its secret once")
    kc.add_argument("--tenant", required=True, help="tenant name or id")
    kc.add_argument("--name", default="default")
    kc.add_argument("--models", help="comma-separated allow-list (default: every model)")
    kc.set_defaults(func=_key_create)
    kr = key.add_parser("revoke", help="revoke a key (its row stays for history)")
    kr.add_argument("id", type=int)
    kr.set_defaults(func=_key_revoke)

    channel = sub.add_parser("channel", help="channels").add_subparsers(dest="channel_command", required=True)
    ca = channel.add_parser("add")
    ca.add_argument("--name", required=True)
    ca.add_argument("--type", default="openai")
    ca.add_argument("--base-url")
    ca.add_argument("--api-key")
    ca.add_argument("--models", required=True, help="comma-separated model names clients use")
    ca.add_argument("--model-mapping", help='JSON, e.g. {"alias": "upstream-name"}')
    ca.add_argument("--options", help="JSON of extra litellm options")
    ca.set_defaults(func=_channel_add)
    cp = channel.add_parser("probe", help="send the parameter probe's grid to a channel and propose its policy")
    cp.add_argument("name")
    cp.add_argument("--model", help="one of the channel's models (default: its first)")
    cp.add_argument("--apply", action="store_true", help="write the proposal as the policy of the channel's models")
    cp.set_defaults(func=_channel_probe)
    sk = sub.add_parser("secret-key", help="print a new key for RELAY_SECRET_KEY")
    sk.set_defaults(func=_secret_key)
    imp = sub.add_parser("import-oneapi", help="create channels from a ONE API database (dry run by default)")
    imp.add_argument("--database-url", required=True,
                     help="the ONE API database: sqlite:///one-api.db, mysql://..., postgresql://...")
    imp.add_argument("--apply", action="store_true", help="write the channels (default: only print the plan)")
    imp.set_defaults(func=_import_oneapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging.config
    import os

    from relay.request_context import log_config

    log_format = os.environ.get("RELAY_LOG_FORMAT", "text")
    logging.config.dictConfig(log_config(log_format, getattr(args, "log_level", "info")))
    try:
        return args.func(args, Settings.from_env())
    except SecretKeyError as exc:
        print(f"policy-relay: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
