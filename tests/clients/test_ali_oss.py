"""ali-oss (npm, pinned in tests/clients/node/package-lock.json) with broker credentials.

Driven through ``tests/clients/node/run.js``.  The client is built from the broker's reply
as given: ``Oss.Endpoint`` (an IP address, so ali-oss sends ``Host: <bucket>.<region host>``
to it: ``lib/common/utils/createRequest.js``), ``oss-`` + ``Oss.Region``, ``Oss.Bucket``.
Inside the caller's prefix every operation succeeds; outside the emulator answers 403.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.clients.conftest import DevServer, NodeRunner, oss_location

OUTSIDE = "clients/someone-else/"
MULTIPART_BYTES = 10 * 1024 * 1024 + 12345  # >= 10 MB, not a whole number of parts


def _by_op(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{result['op']} {result.get('key')}": result for result in results}


def _denied(result: dict[str, Any]) -> bool:
    return (result["ok"], result["status"], result["code"]) == (False, 403, "AccessDenied")


@pytest.mark.parametrize("v4", [False, True], ids=["v1", "v4"])
def test_put_get_head_delete_list_inside_and_outside(
    dev: DevServer, run_node: NodeRunner, v4: bool
) -> None:
    """ali-oss (V1 header auth by default, or authorizationV4) inside succeeds, outside is 403."""
    prefix = f"clients/{dev.caller}/ali-oss-{'v4' if v4 else 'v1'}/"
    inside, outside = f"{prefix}object.txt", f"{OUTSIDE}ali-oss.txt"
    steps = [
        {"op": "put", "key": inside, "body": "hello from ali-oss"},
        {"op": "get", "key": inside},
        {"op": "head", "key": inside},
        {"op": "list", "key": "v1", "prefix": prefix, "version": 1},
        {"op": "list", "key": "v2", "prefix": prefix, "version": 2},
        {"op": "delete", "key": inside},
        {"op": "head", "key": inside},
        {"op": "put", "key": outside, "body": "x"},
        {"op": "get", "key": outside},
        {"op": "head", "key": outside},
        {"op": "delete", "key": outside},
        {"op": "list", "key": "outside", "prefix": OUTSIDE, "version": 2},
    ]
    results = run_node(steps, client={"v4": v4})
    done = [(r["op"], r["ok"], r["status"]) for r in results[:7]]
    assert done == [
        ("put", True, 200),
        ("get", True, 200),
        ("head", True, 200),
        ("list", True, 200),
        ("list", True, 200),
        ("delete", True, 204),
        ("head", False, 404),
    ], results
    assert results[2]["size"] == len("hello from ali-oss")
    assert results[3]["keys"] == results[4]["keys"] == [inside]
    assert [r["status"] for r in results[7:]] == [403] * 5, results
    assert all(_denied(r) for r in results[7:] if r["op"] != "head"), results


def test_multipart_upload_of_10_mb_inside_and_outside(dev: DevServer, run_node: NodeRunner) -> None:
    """multipartUpload sends >= 10 MB in parts under the prefix; outside it is AccessDenied."""
    key = f"clients/{dev.caller}/ali-oss-multipart.bin"
    steps = [
        {"op": "multipart", "key": key, "size": MULTIPART_BYTES, "partSize": 1024 * 1024},
        {"op": "head", "key": key},
        {"op": "get", "key": key},
        {"op": "multipart", "key": f"{OUTSIDE}big.bin", "size": 300 * 1024, "partSize": 102400},
    ]
    upload, head, get, outside = run_node(steps)
    assert (upload["ok"], upload["status"]) == (True, 200), upload
    assert head["size"] == get["size"] == MULTIPART_BYTES
    assert get["sha256"] == upload["sha256"]
    assert _denied(outside), outside


@pytest.mark.parametrize("v4", [False, True], ids=["signatureUrl", "signatureUrlV4"])
def test_signed_urls_inside_and_outside(dev: DevServer, run_node: NodeRunner, v4: bool) -> None:
    """signatureUrl (V1) and signatureUrlV4 URLs PUT and GET inside; outside: 403 AccessDenied.

    ali-oss refuses to sign a URL for an IP-address endpoint (``lib/common/object/
    signatureUrl.js``: "can not get the object URL when endpoint is IP"), and for one it
    leaves the bucket out of the URL (``lib/common/client/getReqUrl.js``); so, for URLs only,
    the same emulator is named ``localhost`` with path-style addressing (``sldEnable``).
    """
    key = f"clients/{dev.caller}/ali-oss-signed-{'v4' if v4 else 'v1'}.bin"
    steps = [
        {"op": "signedUrl", "key": key, "method": "PUT", "v4": v4, "size": 4096},
        {"op": "signedUrl", "key": key, "method": "GET", "v4": v4},
        {"op": "get", "key": key},
        {"op": "signedUrl", "key": f"{OUTSIDE}signed.bin", "method": "GET", "v4": v4},
    ]
    put, get, fetched, outside = run_node(steps, client={"urlsOnLocalhost": True})
    assert (put["status"], get["status"], put["version"]) == (200, 200, "V4" if v4 else "V1")
    assert fetched["size"] == 4096
    assert _denied(outside), outside


def test_broker_presigned_urls_from_node_fetch(dev: DevServer, run_node: NodeRunner) -> None:
    """Node's fetch sends the broker's presigned PUT and GET; the broker refuses keys outside."""
    key = f"clients/{dev.caller}/node-presigned.bin"
    steps = [
        {"op": "presign", "key": key, "method": "PUT", "size": 512},
        {"op": "presign", "key": key, "method": "GET"},
        {"op": "head", "key": key},
        {"op": "presign", "key": f"{OUTSIDE}presigned.bin", "method": "PUT"},
    ]
    put, get, head, outside = run_node(steps)
    assert (put["status"], get["status"], head["size"]) == (200, 200, 512), (put, get, head)
    assert (outside["by"], outside["status"], outside["code"]) == ("broker", 403, "AccessDenied")


def test_refresh_sts_token_returning_the_broker_reply_unchanged(
    dev: DevServer, run_node: NodeRunner
) -> None:
    """refreshSTSToken returns the reply as is; after refreshes the options still point at OSS."""
    location = oss_location(dev.credentials())
    key = f"clients/{dev.caller}/ali-oss-refresh.txt"
    steps = [
        # refreshSTSTokenInterval 0: ali-oss calls refreshSTSToken before every request.
        {"op": "put", "key": key, "body": "1"},
        {"op": "put", "key": key, "body": "2"},
        {"op": "options"},
        {"op": "get", "key": key},
        {"op": "put", "key": f"{OUTSIDE}refresh.txt", "body": "x"},
        {"op": "counters"},
    ]
    first, second, options, get, outside, counters = run_node(
        steps, client={"refreshIntervalMs": 0}
    )
    assert [first["ok"], second["ok"], get["ok"]] == [True] * 3, (first, second, get)
    assert get["size"] == 1
    assert counters["refreshCalls"] >= 3
    assert options["endpoint"] == location["Endpoint"].rstrip("/") + "/"
    assert options["region"] == f"oss-{location['Region']}"
    assert options["bucket"] == location["Bucket"]
    assert options["accessKeyIdMatchesReply"]
    assert _denied(outside), outside


def test_form_upload_with_the_broker_post_policy(dev: DevServer, run_node: NodeRunner) -> None:
    """A FormData POST of the broker's fields to its host stores the file; other keys are 403."""
    prefix = f"clients/{dev.caller}/"
    key = f"{prefix}ali-oss-form.bin"
    steps = [
        {"op": "postForm", "key": key, "request": {"key": key}, "size": 2048},
        {"op": "head", "key": key},
        {"op": "postForm", "key": f"{prefix}form-by-prefix.bin", "size": 10},
        {"op": "postForm", "key": f"{OUTSIDE}form.bin", "size": 10},
        {"op": "postForm", "key": "x", "request": {"key_prefix": OUTSIDE}},
    ]
    posted, head, by_prefix, outside, broker_refused = run_node(steps)
    assert posted["ok"], posted
    assert posted["status"] in (200, 204), posted
    assert head["size"] == 2048
    assert by_prefix["ok"], by_prefix
    assert outside["by"] == "oss", outside
    assert _denied(outside), outside
    assert (broker_refused["by"], broker_refused["status"]) == ("broker", 403), broker_refused
