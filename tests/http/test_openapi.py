"""GET /openapi.json: true to app.py and the models, valid OpenAPI 3.1, and fuzzed by schemathesis.

The schemathesis run is bounded and deterministic: ``_MAX_EXAMPLES`` cases per
operation and mode, derandomized, no shrinking, no example database.  It runs
in a worker thread (schemathesis sends with ``requests``) while the event loop
serves the real broker, with the STS emulator behind it, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis import checks
from schemathesis.generation import GenerationMode

from broker import errors
from broker.dev.demo import demo_routes
from broker.http.app import make_app
from broker.http.cors import CorsRejected
from broker.http.openapi import openapi_document
from broker.uploads import PostPolicyBody, PresignBody
from tests.conftest import CALLERS, BrokerHarness

SCHEMA = schemathesis.openapi.from_dict(openapi_document(), config=schemathesis.Config(seed=0))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]

_MAX_EXAMPLES = 30
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# What `sts-broker dev` adds (the demo page and what it serves), never `serve`.
_DEV_ONLY_ROUTES = frozenset((route.method, route.path) for route in demo_routes())
# caller -> a policy it may use and its rendered prefix there
_USABLE = {
    "alice": ("avatar-upload", "avatars/alice/"),
    "svc-a": ("service-uploads", "services/svc-a/"),
}
_CONFORMANCE = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


def _router_operations(app: Any) -> set[tuple[str, str]]:
    # aiohttp registers HEAD beside every GET (allow_head); the document says so once.
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("HEAD", "*")  # "*": the catch-all answering 404/405
    }


def _documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in _HTTP_METHODS
    }


async def test_every_route_is_documented(broker: BrokerHarness) -> None:
    """The routes of the running app and the operations in the document are the same set."""
    assert _router_operations(broker.client.app) == _documented_operations(openapi_document())


async def test_only_the_dev_demo_page_is_left_out(broker: BrokerHarness) -> None:
    """With the dev demo page on, its routes (/demo) are the only ones the document leaves out."""
    app = make_app(broker.services, demo=True)
    undocumented = _router_operations(app) - _documented_operations(openapi_document())
    assert undocumented == _DEV_ONLY_ROUTES
    assert ("GET", "/demo") in undocumented


def test_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    validate(openapi_document(), cls=OpenAPIV31SpecValidator)


def test_document_is_built_once_and_handed_out_as_copies() -> None:
    """Each call returns an equal, independent document, so no caller can corrupt the cache."""
    first = openapi_document()
    first["paths"].clear()
    assert openapi_document()["paths"]


async def test_served_document_is_the_built_one(broker: BrokerHarness) -> None:
    """GET /openapi.json needs no token and serves exactly openapi_document()."""
    async with broker.client.get("/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == openapi_document()


def test_request_bodies_are_the_models_own_schemas() -> None:
    """Request bodies are the pydantic models' JSON Schemas: lengths, patterns, closed objects."""
    schemas = openapi_document()["components"]["schemas"]
    for model in (PresignBody, PostPolicyBody):
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert schemas[model.__name__] == expected
        assert schemas[model.__name__]["additionalProperties"] is False
    presign = schemas["PresignBody"]["properties"]
    assert presign["key"]["maxLength"] == 1023
    assert presign["expires_seconds"]["anyOf"][0] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 604800,
    }


def test_credentials_parameters_and_errors() -> None:
    """The policy pattern, min_ttl_seconds, both token forms and the SDK-compatible error body."""
    operation = openapi_document()["paths"]["/v1/credentials/{policy}"]["get"]
    parameters = {param["name"]: param for param in operation["parameters"]}
    assert parameters["policy"]["schema"]["pattern"] == "^[a-z0-9][a-z0-9-]{0,62}$"
    assert parameters["min_ttl_seconds"]["schema"] == {"type": "integer", "minimum": 0}
    narrowing = {
        name: parameters[name]["schema"] for name in ("bucket", "prefix", "key", "actions")
    }
    assert Draft202012Validator(narrowing["prefix"]).is_valid("services/svc-a/run-1/")
    assert not Draft202012Validator(narrowing["prefix"]).is_valid("services/*/")
    assert Draft202012Validator(narrowing["key"]).is_valid("services/svc-a/a.csv")
    assert not Draft202012Validator(narrowing["key"]).is_valid("services/svc-a/")
    assert Draft202012Validator(narrowing["actions"]).is_valid("get,list")
    assert not Draft202012Validator(narrowing["actions"]).is_valid("get,read")
    assert not Draft202012Validator(narrowing["bucket"]).is_valid("Bucket_1")
    assert operation["security"] == [{"bearer": []}, {"accessToken": []}]
    assert set(operation["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "429",
        "502",
        "503",
        "504",
    }
    error_403 = operation["responses"]["403"]["content"]["application/json"]["schema"]
    assert set(error_403["required"]) == {
        "error",
        "StatusCode",
        "ErrorCode",
        "ErrorMessage",
        "Code",
    }
    assert error_403["properties"]["Code"]["enum"] == ["AccessDenied", "TemplateValueRejected"]
    assert "Retry-After" in operation["responses"]["503"]["headers"]


def test_credentials_reply_holds_the_oss_location_under_oss() -> None:
    """The documented reply nests the OSS location under Oss, and nowhere else."""
    schema = openapi_document()["components"]["schemas"]["Credentials"]
    assert not {"Bucket", "Region", "Endpoint", "Prefix"} & set(schema["properties"])
    oss = schema["properties"]["Oss"]
    assert oss["required"] == ["Bucket", "Region", "Endpoint", "Prefix", "AddressStyle"]
    assert oss["additionalProperties"] is False
    assert oss["properties"]["AddressStyle"]["enum"] == ["virtual", "path", "cname"]
    assert {"Key", "Grants"} <= set(oss["properties"])  # present only when they apply
    assert oss["properties"]["Grants"]["items"]["required"] == ["Bucket", "Prefix", "Actions"]


@pytest.mark.parametrize(
    ("endpoint", "valid"),
    [
        ("https://oss-cn-hangzhou.aliyuncs.com", True),
        ("http://127.0.0.1:9100", True),
        ("oss-cn-hangzhou.aliyuncs.com", False),
        ("127.0.0.1:9100", False),
        ("https://oss-cn-hangzhou.aliyuncs.com/bucket", False),
    ],
)
def test_documented_endpoints_carry_their_scheme(endpoint: str, valid: bool) -> None:
    """Credentials' Oss.Endpoint and /v1/policies' endpoint must be URLs with a scheme."""
    schemas = openapi_document()["components"]["schemas"]
    credentials = schemas["Credentials"]["properties"]["Oss"]["properties"]["Endpoint"]
    listed = schemas["PolicyList"]["properties"]["policies"]["items"]["properties"]["endpoint"]
    for schema in (credentials, listed):
        assert Draft202012Validator(schema).is_valid(endpoint) is valid


def test_every_request_error_code_is_documented() -> None:
    """Each error class a handler can raise appears with its status and code in some operation."""
    documented: set[tuple[str, str]] = set()
    for item in openapi_document()["paths"].values():
        for status, response in item["get" if "get" in item else "post"]["responses"].items():
            schema = response["content"].get("application/json", {}).get("schema", {})
            error = schema.get("properties", {}).get("error", {})
            for code in error.get("properties", {}).get("code", {}).get("enum", []):
                documented.add((status, code))
    # Start-up only, a bug, and the ones no operation can answer (wrong method, CORS preflight).
    unanswerable = {errors.ConfigError, errors.BrokerError, errors.MethodNotAllowed, CorsRejected}
    raised = _subclasses(errors.BrokerError) - unanswerable
    assert {(str(cls.status), cls.code) for cls in raised if not cls.__name__.startswith("_")} == (
        documented
    )


def _subclasses(cls: type[errors.BrokerError]) -> set[type[errors.BrokerError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


# --- schemathesis against the running broker ---


def _success_cases() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("GET /v1/credentials/{policy}", {"path_parameters": {"policy": "avatar-upload"}}),
        (
            "GET /v1/credentials/{policy}",
            {"path_parameters": {"policy": "avatar-upload"}, "query": {"min_ttl_seconds": 60}},
        ),
        ("GET /v1/credentials/{policy}", {"path_parameters": {"policy": "report-jobs"}}),
        (
            "GET /v1/credentials/{policy}",
            {
                "path_parameters": {"policy": "service-uploads"},
                "query": {"key": "services/svc-a/a.csv", "actions": "get"},
            },
        ),
        (
            "POST /v1/presign",
            {
                "body": {
                    "policy": "avatar-upload",
                    "key": "avatars/alice/me.png",
                    "content_type": "image/png",
                    "content_length": 1024,
                    "expires_seconds": 60,
                }
            },
        ),
        (
            "POST /v1/post-policy",
            {"body": {"policy": "avatar-upload", "content_type": "image/png"}},
        ),
        (
            "POST /v1/post-policy",
            {"body": {"policy": "service-uploads", "key": "services/svc-a/x.bin"}},
        ),
        ("GET /v1/policies", {}),
        ("GET /healthz", {}),
        ("GET /readyz", {}),
        ("GET /metrics", {}),
        ("GET /openapi.json", {}),
    ]


def _operation(label: str) -> Any:
    return next(operation for operation in OPERATIONS if operation.label == label)


def _bearer(caller: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {CALLERS[caller][0]}"}


def _call_success_cases(base_url: str) -> list[int]:
    statuses = []
    with requests.Session() as session:
        for label, parts in _success_cases():
            case = _operation(label).Case(**parts)
            internal = "service-uploads" in str(parts) or "report-jobs" in str(parts)
            headers = _bearer("svc-a" if internal else "alice")
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
            case.validate_response(response, checks=_CONFORMANCE, headers=headers)
            statuses.append(response.status_code)
    return statuses


async def test_success_replies_conform_to_the_document(broker: BrokerHarness) -> None:
    """A good request to every operation gets 200 with headers and body as documented."""
    base_url = str(broker.client.make_url("/"))
    statuses = await asyncio.to_thread(_call_success_cases, base_url)
    assert statuses == [200] * len(_success_cases())


def _pin_usable(case: Any, caller: str) -> None:
    """Point a generated case at a policy ``caller`` may use, so fuzzing reaches signing."""
    policy, prefix = _USABLE[caller]
    if "policy" in case.path_parameters:
        case.path_parameters["policy"] = policy
    if isinstance(case.body, dict) and "policy" in case.body:
        case.body["policy"] = policy
        for field in ("key", "key_prefix"):
            if isinstance(case.body.get(field), str):
                case.body[field] = prefix + case.body[field]


def _fuzz(operation: Any, base_url: str, mode: str) -> set[int]:
    """Run ``_MAX_EXAMPLES`` generated cases; every response must be documented and not 5xx."""
    generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
    extra_checks = [checks.negative_data_rejection] if mode == "negative" else []
    statuses: set[int] = set()

    with requests.Session() as session:

        @settings(
            max_examples=_MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=operation.as_strategy(generation),
            caller=st.sampled_from(sorted(_USABLE)),
            pin=st.booleans(),
        )
        def run(case: Any, caller: str, pin: bool) -> None:
            headers = None
            if mode != "anonymous":
                headers = _bearer(caller)
                if case.query:
                    case.query.pop("access_token", None)
                if pin and mode == "authenticated":
                    _pin_usable(case, caller)
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
            statuses.add(response.status_code)
            case.validate_response(
                response, checks=_CONFORMANCE, additional_checks=extra_checks, headers=headers
            )

        run()
    return statuses


def _fuzz_runs() -> list[Any]:
    """Every operation with and without a key; schema-violating input where it has any input."""
    runs = []
    for operation in OPERATIONS:
        modes = ["authenticated", "anonymous"]
        if operation.path_parameters or operation.query or operation.body:
            modes.append("negative")
        runs += [pytest.param(operation, mode, id=f"{operation.label} {mode}") for mode in modes]
    return runs


@pytest.mark.parametrize(("operation", "mode"), _fuzz_runs())
async def test_schemathesis_finds_no_server_error_or_schema_mismatch(
    broker: BrokerHarness, operation: Any, mode: str
) -> None:
    """Generated requests (keyed, anonymous, schema-violating) get documented, non-5xx replies."""
    base_url = str(broker.client.make_url("/"))
    statuses = await asyncio.to_thread(_fuzz, operation, base_url, mode)
    assert statuses
    assert max(statuses) < 500
    if mode == "anonymous":
        assert broker.sts.emulator.calls == []
