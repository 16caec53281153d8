"""``sts-broker``: argv → settings → logging → run.  The subcommands live here.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
from aiohttp import web

from broker.auth import generate_api_key, hash_api_key
from broker.config import Settings, load_settings
from broker.credentials.sealing import load_encryption_keys
from broker.dev.stack import DEV_CALLER, DevStack, dev_stack
from broker.errors import BrokerError, ConfigError
from broker.http.app import BrokerRunner, make_app, runner_options, ssl_context
from broker.logs import configure_logging
from broker.models import Principal
from broker.policies import (
    MAX_POLICY_CHARS,
    PolicySet,
    load_policies,
    load_policy_file,
    render_policy,
    render_prefix,
)
from broker.reload import reload_policies, watch_policies
from broker.services import Services, build_services

__all__ = ["main"]

log = structlog.get_logger("broker.cli")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
_SHUTDOWN_TIMEOUT_SECONDS = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sts-broker`` console script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as err:
        print(f"configuration error:\n{err}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sts-broker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config", type=Path, default=Path("config/broker.yaml"))
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); the STS budget is divided",
    )
    serve.set_defaults(run=_cmd_serve)

    dev = sub.add_parser("dev", help="run locally with an embedded STS emulator, no cloud account")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--policies-dir", type=Path, default=Path("policies"))
    dev.add_argument("--storage-dir", type=Path, default=Path("var/dev-oss"))
    dev.set_defaults(run=_cmd_dev)

    check = sub.add_parser("check", help="validate config and policy files")
    check.add_argument("--config", type=Path, default=None)
    check.add_argument("policy_files", nargs="*", type=Path, metavar="POLICY_FILE")
    check.set_defaults(run=_cmd_check)

    render = sub.add_parser("render", help="print the RAM policy sent to STS for a caller")
    render.add_argument("policy")
    render.add_argument("--subject", required=True)
    render.add_argument("--group", action="append", default=[], dest="groups")
    render.add_argument("--config", type=Path, default=None)
    render.add_argument("--policies-dir", type=Path, default=Path("policies"))
    render.set_defaults(run=_cmd_render)

    hash_key = sub.add_parser("hash-key", help="make a key_sha256 for the config")
    hash_key.add_argument("--key", help="an existing key (default: read stdin, or make a new one)")
    hash_key.set_defaults(run=_cmd_hash_key)
    return parser


def _check_secrets(settings: Settings) -> None:
    """Files and variables read only at start (the shared cache's keys): fail with exit 2."""
    if settings.cache.backend == "redis" and settings.cache.redis is not None:
        config_dir = settings.source.parent if settings.source is not None else None
        load_encryption_keys(settings.cache.redis, config_dir=config_dir)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    policies = load_policies(settings.policies_dir)
    _check_secrets(settings)
    if not 1 <= args.workers <= 64:
        print("--workers must be from 1 to 64", file=sys.stderr)
        return EXIT_CONFIG
    if args.workers > 1:
        return _run_workers(args.config, args.workers)
    configure_logging(settings.logging.format, settings.logging.level, batched=True)
    asyncio.run(_serve(build_services(settings, policies)))
    return EXIT_OK


def _run_workers(config: Path, workers: int) -> int:
    """Start ``workers`` processes on one port; forward SIGTERM/SIGINT/SIGHUP; exit when all do.

    Each worker keeps its own cache and gets ``1/workers`` of the STS call
    budget, so together they stay within the configured account budget.
    """
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_worker_main, args=(config, workers, index), daemon=False)
        for index in range(workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for child in children:
        child.join()
    return EXIT_OK if all(child.exitcode == 0 for child in children) else EXIT_FAILURE


def _worker_main(config: Path, workers: int, index: int) -> None:
    settings = load_settings(config)
    configure_logging(settings.logging.format, settings.logging.level, batched=True)
    structlog.contextvars.bind_contextvars(worker=index)
    policies = load_policies(settings.policies_dir)
    services = build_services(settings, policies, process_share=1 / workers)
    asyncio.run(_serve(services, reuse_port=True))


def _cmd_dev(args: argparse.Namespace) -> int:
    policies_dir = args.policies_dir.resolve()
    policies = load_policies(policies_dir)
    configure_logging("console" if sys.stderr.isatty() else "json", "info")
    storage_dir = args.storage_dir.resolve()
    storage_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_dev(args.port, policies_dir, policies, storage_dir))
    return EXIT_OK


async def _dev(port: int, policies_dir: Path, policies: PolicySet, storage_dir: Path) -> None:
    async with dev_stack(policies, policies_dir, storage_dir, port=port) as stack:
        await _serve(stack.services, banner=lambda url: _dev_banner(url, stack), demo=True)


def _dev_banner(url: str, stack: DevStack) -> None:
    first = next(iter(stack.services.policies)).name
    names = ", ".join(policy.name for policy in stack.services.policies)
    print(
        f"\n  oss-sts-broker dev mode\n"
        f"  broker:        {url}\n"
        f"  demo page:     {url}/demo#key={stack.dev_key}\n"
        f"  STS emulator:  {stack.sts_url}\n"
        f"  OSS emulator:  {stack.oss_url}   (objects stored in {stack.storage_dir})\n"
        f"  policies:      {names}\n"
        f"  dev API key:   {stack.dev_key}   (caller id '{DEV_CALLER}'; new on every start)\n\n"
        f"  try:\n"
        f"    curl -s -H 'Authorization: Bearer {stack.dev_key}' {url}/v1/credentials/{first}\n",
        file=sys.stderr,
        flush=True,
    )


async def _serve(
    services: Services,
    banner: Callable[[str], None] | None = None,
    *,
    demo: bool = False,
    reuse_port: bool = False,
) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads policies.

    On SIGTERM: readiness turns false at once, the listener closes after
    ``shutdown_delay_seconds`` (time for load balancers to notice), in-flight
    requests get ``shutdown_timeout_seconds`` to finish, then background
    refreshes are cancelled and the process exits 0.
    """
    listen = services.settings.listen
    app = make_app(services, demo=demo)
    runner = BrokerRunner(
        app, shutdown_timeout=listen.shutdown_timeout_seconds, **runner_options(services)
    )
    await runner.setup()
    context = ssl_context(listen.tls) if listen.tls is not None else None
    site = web.TCPSite(
        runner, listen.host, listen.port, ssl_context=context, reuse_port=reuse_port or None
    )
    await site.start()
    scheme = "https" if context is not None else "http"
    url = f"{scheme}://{listen.host}:{_bound_port(runner, listen.port)}"
    log.info("broker_started", url=url, policies=len(services.policies))
    if banner is not None:
        banner(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_policies(services))
    watcher = None
    if services.settings.watch_policies:
        watcher = asyncio.create_task(watch_policies(services))
    try:
        await stop.wait()
    finally:
        services.shutting_down = True
        log.info("broker_stopping", delay_seconds=listen.shutdown_delay_seconds)
        if watcher is not None:
            watcher.cancel()
        await asyncio.sleep(listen.shutdown_delay_seconds)
        await runner.cleanup()
        log.info("broker_stopped")


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default


def _cmd_check(args: argparse.Namespace) -> int:
    problems: list[str] = []
    checked: list[str] = []
    if args.config is not None:
        try:
            settings = load_settings(args.config)
            policies = load_policies(settings.policies_dir)
            _check_secrets(settings)
            checked.append(
                f"{args.config}: ok ({len(policies)} policies in {settings.policies_dir})"
            )
        except ConfigError as err:
            problems.extend(err.problems)
    for path in args.policy_files:
        try:
            policy = load_policy_file(path)
            checked.append(f"{path}: ok (policy {policy.name!r})")
        except ConfigError as err:
            problems.extend(err.problems)
    if not args.policy_files and args.config is None:
        print("nothing to check: give --config and/or policy files", file=sys.stderr)
        return EXIT_CONFIG
    for line in problems:
        print(line, file=sys.stderr)
    for line in checked:
        print(line)
    return EXIT_CONFIG if problems else EXIT_OK


def _cmd_render(args: argparse.Namespace) -> int:
    policies_dir = load_settings(args.config).policies_dir if args.config else args.policies_dir
    policy = load_policies(policies_dir).get(args.policy)
    if policy is None:
        print(f"no policy named {args.policy!r} in {policies_dir}", file=sys.stderr)
        return EXIT_CONFIG
    principal = Principal(subject=args.subject, groups=tuple(args.groups))
    prefix = render_prefix(policy, principal)
    document = render_policy(policy, prefix)
    print(json.dumps(json.loads(document), indent=2))
    print(f"\n{len(document)} of {MAX_POLICY_CHARS} characters (minified, as sent to STS)")
    return EXIT_OK


def _cmd_hash_key(args: argparse.Namespace) -> int:
    key = args.key
    if key is None and not sys.stdin.isatty():
        key = sys.stdin.readline().strip() or None
    generated = key is None
    if key is None:
        key = generate_api_key()
    if generated:
        print(f"key:        {key}   (give this to the caller; it is not stored)")
    print(f"key_sha256: {hash_api_key(key)}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
