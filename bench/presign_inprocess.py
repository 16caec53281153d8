"""µs per presigned URL: broker.signing.presign() against alibabacloud_oss_v2 Client.presign().

Run as ``.venv/bin/python bench/presign_inprocess.py`` (``bench/run.py`` calls
``measure()``).  Both sides sign the same inputs at the same fixed signing time;
outputs are checked byte-identical first, then timed in interleaved rounds
after a warm-up, and the median round is reported as a Markdown table.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import alibabacloud_oss_v2 as oss
from alibabacloud_oss_v2.credentials import StaticCredentialsProvider
from alibabacloud_oss_v2.signer import SignerV4

from broker.models import Credentials
from broker.signing import OssEndpoint, PresignInput, presign

__all__ = ["CaseTiming", "main", "measure"]

ROUNDS = 15
CALLS_PER_ROUND = 2000
WARMUP_CALLS = 3000

SIGNING_TIME = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
TOKEN = "CAIS" + "x/Yz+0123456789abcdefABCDEF" * 24  # an STS token is ~600 characters
# Valid for an hour after the signing time, as a token that signs is (an expired one's
# signing state is never memoised: broker.signing.v4.key_state).
EXPIRATION = SIGNING_TIME + timedelta(hours=1)
CREDS = Credentials("STS.NUgYrLnoC37mZZCNnAbez2YBb", "Secret+/xyz0123456789", TOKEN, EXPIRATION)
ENDPOINT = OssEndpoint("oss-cn-hangzhou.aliyuncs.com")
UPLOAD_ID = "0004B9894A22E5B1888A1E29F8236E2D"


class _FixedTimeSigner(SignerV4):  # type: ignore[misc]
    def sign(self, signing_ctx: Any) -> None:
        signing_ctx.signing_time = SIGNING_TIME
        super().sign(signing_ctx)


def _sdk_client() -> Any:
    cfg = oss.config.load_default()
    cfg.credentials_provider = StaticCredentialsProvider(
        CREDS.access_key_id, CREDS.access_key_secret, CREDS.security_token
    )
    cfg.region = "cn-hangzhou"
    cfg.endpoint = ENDPOINT.host
    return oss.Client(cfg, signer=_FixedTimeSigner())


def _cases() -> list[tuple[str, PresignInput, Any]]:
    key = "avatars/alice/profile photo é.png"
    base = {
        "bucket": "examplebucket",
        "key": key,
        "region": "cn-hangzhou",
        "endpoint": ENDPOINT,
        "expires_seconds": 600,
    }
    put_headers = {"Content-Type": "image/png", "x-oss-forbid-overwrite": "true"}
    return [
        (
            "put_object (Content-Type, forbid-overwrite)",
            PresignInput(method="PUT", headers=put_headers, **base),
            oss.PutObjectRequest(
                bucket="examplebucket", key=key, content_type="image/png", forbid_overwrite=True
            ),
        ),
        (
            "get_object",
            PresignInput(method="GET", **base),
            oss.GetObjectRequest(bucket="examplebucket", key=key),
        ),
        (
            "upload_part (partNumber, uploadId)",
            PresignInput(method="PUT", query={"partNumber": "3", "uploadId": UPLOAD_ID}, **base),
            oss.UploadPartRequest(
                bucket="examplebucket", key=key, part_number=3, upload_id=UPLOAD_ID
            ),
        ),
    ]


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1000


@dataclass(frozen=True)
class CaseTiming:
    """One case: median µs per call for ours and the SDK, and whether outputs matched."""

    name: str
    ours_us: float
    sdk_us: float
    identical: bool

    @property
    def speedup(self) -> float:
        """How many times faster ours is than the SDK."""
        return self.sdk_us / self.ours_us


def _time_case(
    name: str, ours: Callable[[], str], sdk: Callable[[], str], rounds: int
) -> CaseTiming:
    """Check byte-identical output, warm up, then time ``rounds`` interleaved rounds."""
    identical = ours() == sdk()
    _per_call_us(ours, WARMUP_CALLS)
    _per_call_us(sdk, WARMUP_CALLS // 10)
    ours_us, sdk_us = [], []
    gc.disable()
    try:
        for _ in range(rounds):
            ours_us.append(_per_call_us(ours, CALLS_PER_ROUND))
            sdk_us.append(_per_call_us(sdk, CALLS_PER_ROUND // 10))
    finally:
        gc.enable()
    return CaseTiming(name, statistics.median(ours_us), statistics.median(sdk_us), identical)


def measure(rounds: int = ROUNDS) -> list[CaseTiming]:
    """Time every case, ours against the SDK, in this process."""
    client = _sdk_client()
    expiration = SIGNING_TIME + timedelta(seconds=600)
    timings = []
    for name, ours_input, sdk_request in _cases():

        def ours(request: PresignInput = ours_input) -> str:
            return presign(CREDS, request, SIGNING_TIME).url

        def sdk(request: Any = sdk_request) -> str:
            return str(client.presign(request, expiration=expiration).url)

        timings.append(_time_case(name, ours, sdk, rounds))
    return timings


def main() -> None:
    print(f"Python {sys.version.split()[0]}, alibabacloud_oss_v2 {oss.__version__}")
    print(f"median of {ROUNDS} interleaved rounds x {CALLS_PER_ROUND} calls, after warm-up\n")
    print("| case | ours (µs) | SDK (µs) | speed-up | byte-identical |")
    print("| --- | ---: | ---: | ---: | --- |")
    timings = measure()
    for t in timings:
        same = "yes" if t.identical else "NO"
        print(f"| {t.name} | {t.ours_us:.2f} | {t.sdk_us:.1f} | {t.speedup:.1f}x | {same} |")
    if not all(t.identical for t in timings):
        raise SystemExit("outputs differ: see the byte-identical column")


if __name__ == "__main__":
    main()
