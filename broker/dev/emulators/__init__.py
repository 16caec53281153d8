"""Local stand-ins for Alibaba Cloud STS and OSS that speak the real wire protocols.

Both run as real aiohttp servers on 127.0.0.1 (``serve_app``):

- ``sts``: the STS emulator (AssumeRole); ``sts_signature`` checks ACS3-HMAC-SHA256,
  ``sts_params`` STS's parameter limits, ``sts_errors`` its error answers,
  ``sts_faults`` the faults tests inject.
- ``oss``: the OSS emulator; ``oss_request`` reads the target and the API,
  ``oss_auth`` dispatches to ``oss_signature`` (V4) and ``oss_signature_v1`` (V1),
  ``oss_post`` checks PostObject forms, ``oss_ram`` authorizes with ``ram`` (RAM
  policy evaluation with conditions); ``oss_store`` keeps objects on disk,
  ``oss_list`` lists them, ``oss_multipart`` holds multipart uploads;
  ``oss_errors`` and ``oss_xml`` are OSS's error codes and XML bodies.
"""

from __future__ import annotations

from aiohttp import web

__all__ = ["serve_app"]


async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``host:port`` (0 picks a free port); returns the runner and base URL.

    No access log: request lines can carry signatures and security tokens.
    """
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    bracketed = f"[{host}]" if ":" in host else host
    return runner, f"http://{bracketed}:{bound_port}"
