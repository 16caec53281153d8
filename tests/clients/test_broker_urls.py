"""The broker's own presigned URLs and post policies, used as a client would, at the emulator.

A plain HTTP client (requests) sends exactly what ``/v1/presign`` and ``/v1/post-policy``
return: the URL with its ``signed_headers``, or the form ``fields`` plus ``file`` to ``host``.
Inside the caller's prefix the upload lands; outside, the broker refuses to sign (403), and a
form whose ``key`` is changed to leave the signed prefix is refused by the emulator (403).
"""

from __future__ import annotations

import requests

from tests.clients.conftest import DevServer, oss_location

OUTSIDE = "clients/someone-else/"


def test_presigned_put_and_get_inside_the_prefix(dev: DevServer) -> None:
    """A broker-presigned PUT stores the body and a presigned GET reads it back."""
    key = f"{oss_location(dev.credentials())['Prefix']}broker-presigned.txt"
    put_body = {"policy": "client-tests", "key": key, "method": "PUT", "content_length": 9}
    status, put = dev.post("/v1/presign", put_body)
    assert status == 200, put
    sent = requests.put(put["url"], data=b"presigned", headers=put["signed_headers"], timeout=10)
    assert sent.status_code == 200, sent.text
    status, get = dev.post("/v1/presign", {"policy": "client-tests", "key": key, "method": "GET"})
    assert status == 200, get
    got = requests.get(get["url"], headers=get["signed_headers"], timeout=10)
    assert (got.status_code, got.content) == (200, b"presigned")


def test_presign_outside_the_prefix_is_refused_by_the_broker(dev: DevServer) -> None:
    """The broker signs no URL for a key outside the caller's prefix: 403 AccessDenied."""
    body = {"policy": "client-tests", "key": f"{OUTSIDE}x.txt", "method": "PUT"}
    status, reply = dev.post("/v1/presign", body)
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")


def test_post_policy_form_inside_and_outside_the_prefix(dev: DevServer) -> None:
    """The broker's form uploads under the prefix; the same form with an outside key is 403."""
    prefix = oss_location(dev.credentials())["Prefix"]
    status, signed = dev.post("/v1/post-policy", {"policy": "client-tests"})
    assert status == 200, signed
    fields = {**signed["fields"], "key": f"{prefix}broker-form.txt"}
    files = {"file": ("form.txt", b"form body")}
    posted = requests.post(signed["host"], data=fields, files=files, timeout=10)
    assert posted.status_code in (200, 204), posted.text
    outside = {**signed["fields"], "key": f"{OUTSIDE}broker-form.txt"}
    refused = requests.post(signed["host"], data=outside, files=files, timeout=10)
    assert refused.status_code == 403
    assert "<Code>AccessDenied</Code>" in refused.text
    status, reply = dev.post("/v1/post-policy", {"policy": "client-tests", "key_prefix": OUTSIDE})
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")
