"""alibabacloud-credentials' credentials-URI provider on the broker, feeding alibabacloud-oss-v2.

The provider is pointed at ``/v1/credentials/<policy>?access_token=<key>`` (it cannot set
headers) exactly as a service would configure it, and its credentials sign the SDK's
requests through ``CredentialsProviderFunc`` (the wiring Alibaba's oss-v2 docs show).  It
treats a token as stale 15 minutes before it expires (``provider/uri.py`` ``_get_stale_time``),
so the example policy meant for it lasts >= 3600 s and it fetches once, not once per call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import alibabacloud_oss_v2 as oss
from alibabacloud_credentials.client import Client as CredentialsClient
from alibabacloud_credentials.models import Config as CredentialsConfig

from tests.clients.conftest import PROVIDER_POLICY, TEST_POLICY, DevServer, oss_location, sum_metric
from tests.clients.test_oss_v2 import OUTSIDE, assert_access_denied, client_from_reply

UPLOADS = 150


@dataclass
class _Counted:
    """An oss-v2 credentials provider over the credentials library; counts SDK look-ups."""

    credentials: CredentialsClient
    calls: int = 0

    def __call__(self) -> oss.credentials.Credentials:
        self.calls += 1
        found = self.credentials.get_credential()
        return oss.credentials.Credentials(
            access_key_id=found.access_key_id,
            access_key_secret=found.access_key_secret,
            security_token=found.security_token,
        )


def _provider_client(dev: DevServer, policy: str) -> tuple[oss.Client, _Counted, str, str]:
    """oss-v2 signing with the URI provider's credentials; the location read once (bearer)."""
    config = CredentialsConfig(type="credentials_uri", credentials_uri=dev.credentials_uri(policy))
    counted = _Counted(CredentialsClient(config))
    reply = dev.credentials(policy)
    client = client_from_reply(reply, oss.credentials.CredentialsProviderFunc(counted))
    location = oss_location(reply)
    return client, counted, location["Bucket"], location["Prefix"]


def test_uri_provider_credentials_work_inside_and_are_refused_outside(dev: DevServer) -> None:
    """The URI provider's credentials put and get inside the prefix; outside is AccessDenied."""
    client, counted, bucket, prefix = _provider_client(dev, TEST_POLICY)
    key = f"{prefix}uri-provider.txt"
    client.put_object(oss.PutObjectRequest(bucket=bucket, key=key, body=b"via provider"))
    got = client.get_object(oss.GetObjectRequest(bucket=bucket, key=key))
    assert got.body.read() == b"via provider"
    outside = oss.PutObjectRequest(bucket=bucket, key=f"{OUTSIDE}uri.txt", body=b"x")
    assert_access_denied(lambda: client.put_object(outside))
    assert counted.calls >= 3


_ENV_SCRIPT = """
import json, sys
import alibabacloud_oss_v2 as oss
from alibabacloud_credentials.provider import URLCredentialsProvider
provider = URLCredentialsProvider()  # reads ALIBABA_CLOUD_CREDENTIALS_URI
found = provider.get_credentials()
static = oss.credentials.StaticCredentialsProvider(
    found.get_access_key_id(), found.get_access_key_secret(), found.get_security_token())
location = json.loads(sys.argv[1])
client = oss.Client(oss.config.Config(
    region=location["Region"], endpoint=location["Endpoint"], credentials_provider=static))
results = {}
for name, key in (("inside", location["Prefix"] + "env-uri.txt"), ("outside", sys.argv[2])):
    try:
        client.put_object(oss.PutObjectRequest(bucket=location["Bucket"], key=key, body=b"env"))
        results[name] = "ok"
    except oss.exceptions.OperationError as err:
        results[name] = err.unwrap().code
print(json.dumps(results))
"""


def test_uri_provider_from_the_environment_variable(dev: DevServer) -> None:
    """ALIBABA_CLOUD_CREDENTIALS_URI alone configures the provider: inside ok, outside refused."""
    location = oss_location(dev.credentials())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD_")}
    env["ALIBABA_CLOUD_CREDENTIALS_URI"] = dev.credentials_uri(TEST_POLICY)
    done = subprocess.run(  # noqa: S603 - this interpreter, our own script
        [sys.executable, "-c", _ENV_SCRIPT, json.dumps(location), f"{OUTSIDE}env-uri.txt"],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == {"inside": "ok", "outside": "AccessDenied"}


def test_150_uploads_through_the_provider_fetch_credentials_once(dev: DevServer) -> None:
    """150 uploads with the shipped provider policy: none fails, one broker request, no STS call."""
    client, counted, bucket, prefix = _provider_client(dev, PROVIDER_POLICY)
    before = dev.metrics()  # the location read above cached the policy's token in the broker
    for n in range(UPLOADS):
        key = f"{prefix}provider-batch/{n}.txt"
        result = client.put_object(oss.PutObjectRequest(bucket=bucket, key=key, body=b"x"))
        assert result.status_code == 200
    after = dev.metrics()
    requests = sum_metric(after, "broker_requests_total", route="credentials") - sum_metric(
        before, "broker_requests_total", route="credentials"
    )
    sts_calls = sum_metric(after, "broker_sts_calls_total") - sum_metric(
        before, "broker_sts_calls_total"
    )
    assert requests == 1  # the provider's one fetch, not one per upload
    assert sts_calls == 0
    assert counted.calls >= UPLOADS  # the SDK asked the provider before every request
    print(
        f"\npython provider: {UPLOADS} uploads, {counted.calls} credential look-ups, "
        f"{requests:.0f} broker credential requests, {sts_calls:.0f} STS calls"
    )
