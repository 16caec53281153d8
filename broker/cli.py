"""``sts-broker``: argv → settings → logging → run.  The subcommands live here.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
Dev mode (``broker.dev``) is imported inside ``dev`` only, so ``serve`` never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from broker import process_credentials
from broker.admin_cli import add_admin_commands
from broker.auth import generate_api_key, hash_api_key
from broker.config import CacheSettings, Settings, load_settings
from broker.errors import BrokerError, ConfigError
from broker.event_loop import CHOICES as LOOP_CHOICES
from broker.event_loop import install as install_event_loop
from broker.event_loop import running_loop_name, settle_heap
from broker.http.app import BrokerRunner, make_app, runner_options, ssl_context
from broker.logs import configure_logging
from broker.policies import PolicySet, load_policies
from broker.preflight import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    check_command,
    check_secrets,
    render_command,
)
from broker.reload import PolicyReloader
from broker.services import Services, build_services

if TYPE_CHECKING:
    from broker.dev.stack import DevStack

__all__ = ["main"]

log = structlog.get_logger("broker.cli")

_SHUTDOWN_TIMEOUT_SECONDS = 10.0
_DEV_PORT_HINT = "--port N (or make run PORT=N)"


class _PortInUse(Exception):
    """The listener's address is taken; the message says how to choose another port."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sts-broker`` console script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as err:
        print(f"configuration error:\n{err}", file=sys.stderr)
        return EXIT_CONFIG
    except _PortInUse as err:
        print(f"sts-broker: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokerError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


_DESCRIPTION = """\
Hands out temporary, narrowly scoped Alibaba Cloud STS credentials for OSS, and
presigned URLs and PostObject form fields signed with them, so that no service
and no browser ever holds a long-term AccessKey."""

_EPILOG = """\
start here:
  sts-broker dev            everything locally, no cloud account (also: make run)
  sts-broker check --config config/broker.yaml policies/*.yaml
  sts-broker serve --config config/broker.yaml

'sts-broker COMMAND --help' describes a command's options.
docs: README.md (overview), policies/README.md (policy files), docs/api.md (HTTP API),
docs/deployment.md (production); a running broker serves its API at /openapi.json."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sts-broker",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(required=True, title="commands", metavar="COMMAND")
    _add_serve(sub)
    _add_dev(sub)
    _add_check(sub)
    _add_render(sub)
    _add_hash_key(sub)
    _add_credentials(sub)
    add_admin_commands(sub, "config/broker.yaml")
    return parser


_Subparsers = argparse._SubParsersAction


def _add_command(
    sub: _Subparsers[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    """A subcommand whose summary is both its line in the list and its help's first line."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")


def _add_path(
    parser: argparse.ArgumentParser, flag: str, default: str | None, metavar: str, text: str
) -> None:
    """A ``--flag FILE`` or ``--flag DIR`` option, read as a Path."""
    value = Path(default) if default is not None else None
    parser.add_argument(flag, type=Path, default=value, metavar=metavar, help=text)


def _add_serve(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    serve = _add_command(sub, "serve", "run the broker")
    config_help = "the broker's config file (default: %(default)s)"
    _add_path(serve, "--config", "config/broker.yaml", "FILE", config_help)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT); the STS budget is divided",
    )
    _add_loop(serve, "(default: listen.event_loop in the config, itself auto by default)")
    serve.set_defaults(run=_cmd_serve)


def _add_loop(parser: argparse.ArgumentParser, default_text: str) -> None:
    """``--loop auto|asyncio|uvloop``: which event loop runs (broker/event_loop.py)."""
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        default=None,
        help=f"the event loop: auto is uvloop when installed, else asyncio {default_text}",
    )


def _add_dev(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    summary = "run locally with STS and OSS emulators and a demo page, no cloud account"
    dev = _add_command(sub, "dev", summary)
    dev.add_argument(
        "--port",
        type=int,
        default=8080,
        metavar="N",
        help="the broker's port on 127.0.0.1 (default: %(default)s; 0 picks a free one)",
    )
    policies_help = "the policy files to serve (default: %(default)s)"
    _add_path(dev, "--policies-dir", "policies", "DIR", policies_help)
    storage_help = "where the OSS emulator stores uploaded objects (default: %(default)s)"
    _add_path(dev, "--storage-dir", "var/dev-oss", "DIR", storage_help)
    dev.add_argument(
        "--token-lifetime",
        type=int,
        default=None,
        metavar="SECONDS",
        help="dev only: the STS emulator issues tokens living SECONDS (e.g. 120) while the "
        "broker still requests 900..43200, to watch token rotation in minutes",
    )
    _add_loop(dev, "(default: auto)")
    dev.set_defaults(run=_cmd_dev)


def _add_check(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    check = _add_command(sub, "check", "validate config and policy files")
    config_help = "a config file to validate, with the policies in its policies_dir"
    _add_path(check, "--config", None, "FILE", config_help)
    check.add_argument(
        "policy_files",
        nargs="*",
        type=Path,
        metavar="POLICY_FILE",
        help="policy files to validate on their own",
    )
    check.set_defaults(run=check_command)


def _add_render(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    render = _add_command(sub, "render", "print the RAM policy sent to STS for a caller")
    render.add_argument("policy", help="the policy's name (the name: in its file)")
    render.add_argument("--subject", required=True, help="the caller's id, as ${subject}")
    render.add_argument(
        "--group",
        action="append",
        default=[],
        dest="groups",
        metavar="GROUP",
        help="a group of the caller, as ${group}; repeat for several",
    )
    render.add_argument(
        "--source-ip",
        metavar="ADDRESS",
        help="the caller's address, for a policy with source_ip: caller",
    )
    _add_path(render, "--config", None, "FILE", "read policies_dir from this config file")
    policies_help = "where the policy files are, without --config (default: %(default)s)"
    _add_path(render, "--policies-dir", "policies", "DIR", policies_help)
    render.set_defaults(run=render_command)


def _add_hash_key(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    hash_key = _add_command(sub, "hash-key", "make a key_sha256 for the config")
    hash_key.add_argument("--key", help="an existing key (default: read stdin, or make a new one)")
    hash_key.set_defaults(run=_cmd_hash_key)


def _add_credentials(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    summary = "fetch credentials from a running broker, printed for the aliyun CLI, env or SDKs"
    credentials = _add_command(sub, "credentials", summary)
    process_credentials.add_arguments(credentials)  # options live beside their use
    credentials.set_defaults(run=_cmd_credentials)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    policies = load_policies(settings.policies_dir)
    check_secrets(settings)
    if not 1 <= args.workers <= 64:
        print("--workers must be from 1 to 64", file=sys.stderr)
        return EXIT_CONFIG
    loop = args.loop or settings.listen.event_loop
    install_event_loop(loop)  # here too with --workers: a missing uvloop fails before any spawn
    if args.workers > 1:
        return _run_workers(args.config, args.workers, loop)
    _configure_daemon_logging(settings)
    port_hint = f"listen.port in {args.config}"
    asyncio.run(_serve(build_services(settings, policies), port_hint=port_hint))
    return EXIT_OK


def _configure_daemon_logging(settings: Settings) -> None:
    """Logging through a bounded, non-blocking sink: a stalled stderr never stops the loop."""
    options = settings.logging
    configure_logging(
        options.format,
        options.level,
        background=True,
        cache_loggers=True,
        max_buffer_bytes=options.max_buffer_bytes,
    )


def _run_workers(config: Path, workers: int, loop: str) -> int:
    """Start ``workers`` processes on one port; forward SIGTERM/SIGINT/SIGHUP; exit when all do.

    Each worker keeps its own cache and gets ``1/workers`` of the STS call
    budget, so together they stay within the configured account budget.
    """
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_worker_main, args=(config, workers, index, loop), daemon=False)
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


def _worker_main(config: Path, workers: int, index: int, loop: str) -> None:
    settings = load_settings(config)
    install_event_loop(loop)
    _configure_daemon_logging(settings)
    structlog.contextvars.bind_contextvars(worker=index)
    policies = load_policies(settings.policies_dir)
    services = build_services(settings, policies, process_share=1 / workers)
    try:
        asyncio.run(_serve(services, port_hint=f"listen.port in {config}", reuse_port=True))
    except _PortInUse as err:
        print(f"sts-broker: worker {index}: {err}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


def _cmd_dev(args: argparse.Namespace) -> int:
    from broker.dev.stack import check_token_lifetime, shortest_duration  # dev mode only

    policies_dir = args.policies_dir.resolve()
    policies = load_policies(policies_dir)
    if args.token_lifetime is not None:
        margin = CacheSettings().refresh_margin_seconds
        try:
            check_token_lifetime(args.token_lifetime, margin, shortest_duration(policies))
        except ValueError as err:
            print(f"sts-broker dev: {err}", file=sys.stderr)
            return EXIT_CONFIG
    install_event_loop(args.loop or "auto")
    fmt = "console" if sys.stderr.isatty() else "json"
    configure_logging(fmt, "info", background=True, cache_loggers=True)
    storage_dir = args.storage_dir.resolve()
    storage_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_dev(args.port, policies_dir, policies, storage_dir, args.token_lifetime))
    return EXIT_OK


async def _dev(
    port: int,
    policies_dir: Path,
    policies: PolicySet,
    storage_dir: Path,
    token_lifetime_seconds: int | None,
) -> None:
    from broker.dev.stack import dev_stack  # dev mode only: serve never loads broker.dev

    lifetime = token_lifetime_seconds
    stack_context = dev_stack(
        policies, policies_dir, storage_dir, port=port, token_lifetime_seconds=lifetime
    )
    async with stack_context as stack:
        await _serve(
            stack.services,
            banner=lambda url: _dev_banner(url, stack),
            port_hint=_DEV_PORT_HINT,
            demo=True,
        )


def _dev_banner(url: str, stack: DevStack) -> None:
    from broker.dev.stack import DEV_CALLER

    first = next(iter(stack.services.policies)).name
    names = ", ".join(policy.name for policy in stack.services.policies)
    print(
        f"\n  oss-sts-broker dev mode\n"
        f"  broker:        {url}\n"
        f"  demo page:     {url}/demo#key={stack.dev_key}\n"
        f"  STS emulator:  {stack.sts_url}\n"
        f"  OSS emulator:  {stack.oss_url}   (objects stored in {stack.storage_dir})\n"
        f"  policies:      {names}\n"
        f"  dev API key:   {stack.dev_key}   (caller id '{DEV_CALLER}'; new on every start)\n"
        f"{_lifetime_line(stack.token_lifetime_seconds)}\n"
        f"  try:\n"
        f"    curl -s -H 'Authorization: Bearer {stack.dev_key}' {url}/v1/credentials/{first}\n\n"
        f"  stop:          Ctrl-C\n",
        file=sys.stderr,
        flush=True,
    )


def _lifetime_line(seconds: int | None) -> str:
    if seconds is None:
        return ""
    return (
        f"  token lifetime: {seconds} s as issued by the STS emulator (dev only; the broker "
        "still requests 900..43200 s)\n"
    )


async def _serve(
    services: Services,
    banner: Callable[[str], None] | None = None,
    *,
    port_hint: str,
    demo: bool = False,
    reuse_port: bool = False,
) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads policies and reopens the audit file.

    On SIGTERM: readiness turns false at once, the listener closes after
    ``shutdown_delay_seconds`` (time for load balancers to notice), in-flight
    requests get ``shutdown_timeout_seconds`` to finish, then background
    refreshes are cancelled and the process exits 0.
    """
    listen = services.settings.listen
    runner, url = await _start(services, port_hint, demo=demo, reuse_port=reuse_port)
    settle_heap()
    loop = running_loop_name()
    log.info("broker_started", url=url, policies=len(services.policies), event_loop=loop)
    if banner is not None:
        banner(url)
    reloader = PolicyReloader(services)
    watcher = None
    if services.settings.watch_policies:
        watcher = asyncio.create_task(reloader.watch())
    try:
        await _wait_for_stop(reloader, services)
    finally:
        services.shutting_down = True
        log.info("broker_stopping", delay_seconds=listen.shutdown_delay_seconds)
        if watcher is not None:
            watcher.cancel()
        await asyncio.sleep(listen.shutdown_delay_seconds)
        await runner.cleanup()
        log.info("broker_stopped")


async def _wait_for_stop(reloader: PolicyReloader, services: Services) -> None:
    """Return on SIGTERM or SIGINT; meanwhile SIGHUP reloads and reopens (``_hang_up``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _hang_up(reloader, services))
    await stop.wait()


def _hang_up(reloader: PolicyReloader, services: Services) -> None:
    """SIGHUP: reload policies and the auth section; reopen the audit file."""
    reloader.reload_soon()
    services.audit.reopen()


async def _start(
    services: Services, port_hint: str, *, demo: bool, reuse_port: bool
) -> tuple[web.AppRunner, str]:
    """Listen as ``listen`` says; the runner and the broker's URL.

    A taken port raises ``_PortInUse`` naming ``port_hint``, the way to choose another.
    """
    listen = services.settings.listen
    runner = BrokerRunner(
        make_app(services, demo=demo),
        shutdown_timeout=listen.shutdown_timeout_seconds,
        **runner_options(services),
    )
    await runner.setup()
    context = ssl_context(listen.tls) if listen.tls is not None else None
    site = web.TCPSite(
        runner, listen.host, listen.port, ssl_context=context, reuse_port=reuse_port or None
    )
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        if err.errno != errno.EADDRINUSE:
            raise
        message = f"port {listen.port} on {listen.host} is already in use; choose another with"
        raise _PortInUse(f"{message} {port_hint}") from None
    scheme = "https" if context is not None else "http"
    return runner, f"{scheme}://{listen.host}:{_bound_port(runner, listen.port)}"


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return default


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


def _cmd_credentials(args: argparse.Namespace) -> int:
    return process_credentials.run(args, os.environ)


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
