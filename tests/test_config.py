"""Configuration file → Settings (broker.config): every problem as file:line: key: problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.config import Settings, api_key_hashes, load_settings
from broker.errors import ConfigError
from tests.conftest import REPO

_HEX = "0" * 64
_OTHER_HEX = "ab" * 32
_UNSAFE_IDS = ["a/b", "${subject}", "*", "a*", "..", ".a", "a\u2215b", "a\uff0fb", "%2F", "", "a b"]


def _write(tmp_path: Path, text: str) -> Path:
    """``text`` as ``broker.yaml`` in a fresh folder."""
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def _problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    """The problems ``load_settings`` reports for ``path`` (it must report some)."""
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={} if environ is None else environ)
    return caught.value.problems


# --- loading ---


def test_example_config_loads_with_paths_relative_to_it() -> None:
    """The shipped config/broker.yaml loads; policies_dir is resolved against its folder."""
    path = REPO / "config" / "broker.yaml"
    settings = load_settings(path, environ={})
    assert settings.source == path
    assert settings.policies_dir == (REPO / "policies").resolve()
    assert [key.id for key in settings.auth.api_keys] == ["svc-reports"]


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_means_every_default(tmp_path: Path, text: str) -> None:
    """An empty file is the default configuration (policies_dir ../policies from the file)."""
    settings = load_settings(_write(tmp_path, text), environ={})
    defaults = Settings()
    assert (settings.listen, settings.sts, settings.cache) == (
        defaults.listen,
        defaults.sts,
        defaults.cache,
    )
    assert settings.policies_dir == (tmp_path.parent / "policies").resolve()


def test_tls_and_jwks_files_are_relative_to_the_config(tmp_path: Path) -> None:
    """tls files and jwt.jwks_file resolve against the config's folder; absolute paths stay."""
    text = (
        "listen:\n  tls: {cert_file: tls/a.crt, key_file: /etc/b.key, client_ca_file: ca.crt}\n"
        "auth:\n  jwt: {issuer: https://idp/, audience: web, jwks_file: jwks.json}\n"
    )
    settings = load_settings(_write(tmp_path, text), environ={})
    tls = settings.listen.tls
    assert tls is not None
    assert (tls.cert_file, tls.key_file) == (tmp_path / "tls" / "a.crt", Path("/etc/b.key"))
    assert tls.client_ca_file == tmp_path / "ca.crt"
    assert settings.auth.jwt is not None
    assert settings.auth.jwt.jwks_file == tmp_path / "jwks.json"


# --- problems name file, line and key ---


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes give one file:line: key: problem each, in one ConfigError."""
    path = _write(tmp_path, "listen:\n  port: 70000\nsts:\n  timeout_seconds: 0\n")
    problems = _problems(path)
    assert [problem.split(": ", 2)[:2] for problem in problems] == [
        [f"{path}:2", "listen.port"],
        [f"{path}:4", "sts.timeout_seconds"],
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "listen:\n  host: 127.0.0.1\n  prot: 8080\n",
            "3: listen.prot: unknown key (did you mean port?)",
        ),
        ("listn:\n  port: 8080\n", "1: listn: unknown key (did you mean listen?)"),
        (
            "sts:\n  retry:\n    max_attempt: 3\n",
            "3: sts.retry.max_attempt: unknown key (did you mean max_attempts?)",
        ),
        (
            f"auth:\n  api_keys:\n    - id: a\n      key_sha265: '{_HEX}'\n",
            "4: auth.api_keys.0.key_sha265: unknown key (did you mean key_sha256?)",
        ),
        ("cache:\n  zzz: 1\n", "2: cache.zzz: unknown key; allowed keys: backend, max_entries"),
    ],
    ids=["listen.prot", "top-level", "nested", "in-a-list", "no-close-key"],
)
def test_typo_names_the_closest_key(tmp_path: Path, text: str, expected: str) -> None:
    """A config typo says which key was meant, as a policy typo does, at any depth."""
    path = _write(tmp_path, text)
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:{expected}"), problem


def test_source_is_not_a_config_key(tmp_path: Path) -> None:
    """source is set by the loader, never read from the file."""
    path = _write(tmp_path, "listen: {port: 1}\nsource: /etc/passwd\n")
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:2: source: unknown key"), problem
    assert "allowed keys: admin, auth, cache," in problem


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("listen:\n  port: 1\n  port: 2\n", "3: listen.port: duplicate key (first at line 2)"),
        ("cors: {}\nlisten: {}\ncors: {}\n", "3: cors: duplicate key (first at line 1)"),
    ],
)
def test_duplicate_key_is_refused_naming_both_lines(
    tmp_path: Path, text: str, problem: str
) -> None:
    """A key given twice is refused (YAML would silently keep the last), naming both lines."""
    path = _write(tmp_path, text)
    assert _problems(path) == [f"{path}:{problem}"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("listen:\n  port: 8080\nauth:\n  api_keys: [{id: a, key_sha256: x}\ncors: {}\n", 4),
        ("listen:\n  host: '127.0.0.1\n  port: 8080\n", 2),
        ("listen:\n  port: 8080\n   host: a\n", 3),
    ],
    ids=["unclosed-bracket", "unclosed-quote", "bad-indent"],
)
def test_syntax_error_points_at_the_broken_line(tmp_path: Path, text: str, line: int) -> None:
    """A YAML syntax error names the line that is broken, not the one after it."""
    path = _write(tmp_path, text)
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:{line}: invalid YAML: "), problem


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    """A list or a scalar at the top is refused at line 1."""
    path = _write(tmp_path, text)
    assert _problems(path) == [f"{path}:1: (top level): must be a mapping of keys"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config file that cannot be read is a ConfigError naming it."""
    path = tmp_path / "nope.yaml"
    [problem] = _problems(path)
    assert problem.startswith(f"{path}: cannot read file")


# --- secrets from the environment ---


def _env_key_config(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        "auth:\n  api_keys:\n    - id: svc\n      key_sha256_env: SVC_KEY_SHA256\n"
        f"    - id: other\n      key_sha256: '{_HEX}'\n",
    )


def test_key_hash_from_the_environment(tmp_path: Path) -> None:
    """key_sha256_env is read from the given environment, beside hashes in the file."""
    environ = {"SVC_KEY_SHA256": _OTHER_HEX}
    settings = load_settings(_env_key_config(tmp_path), environ=environ)
    assert api_key_hashes(settings, environ) == {"svc": _OTHER_HEX, "other": _HEX}


@pytest.mark.parametrize("value", [None, "", "not-a-hash-sekrit", _OTHER_HEX.upper()])
def test_missing_or_bad_key_hash_variable_is_named_not_echoed(
    tmp_path: Path, value: str | None
) -> None:
    """An unset or malformed variable is named with its file:line; its value is never echoed."""
    path = _env_key_config(tmp_path)
    environ = {} if value is None else {"SVC_KEY_SHA256": value}
    [problem] = _problems(path, environ)
    assert problem == (
        f"{path}:4: auth.api_keys.0.key_sha256_env: environment variable SVC_KEY_SHA256 "
        "is not set to 64 lower-case hex characters"
    )


@pytest.mark.parametrize("name", ["svc_key", "1KEY", "KEY-X"])
def test_variable_names_are_upper_case_identifiers(tmp_path: Path, name: str) -> None:
    """key_sha256_env names an upper-case variable, refused otherwise before any lookup."""
    path = _write(tmp_path, f"auth:\n  api_keys:\n    - id: a\n      key_sha256_env: {name}\n")
    [problem] = _problems(path, {name: _HEX})
    assert problem.startswith(f"{path}:4: auth.api_keys.0.key_sha256_env: "), problem


def test_redis_password_never_in_the_url(tmp_path: Path) -> None:
    """A Redis URL with a password is refused without echoing it: name its variable instead."""
    text = (
        "cache:\n  backend: redis\n  redis:\n    url: redis://:hunter2-sekrit@127.0.0.1:6379/0\n"
        "    encryption_keys_env: BROKER_CACHE_KEYS\n"
    )
    path = _write(tmp_path, text)
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:4: cache.redis.url: ")
    assert "password_env" in problem
    assert "hunter2" not in problem


# --- caller ids: the same rule as template values ---


@pytest.mark.parametrize("caller_id", _UNSAFE_IDS)
def test_unsafe_api_key_ids_are_refused_at_config_load(tmp_path: Path, caller_id: str) -> None:
    """An API key id that could widen a prefix is a ConfigError naming file and key."""
    config = tmp_path / "broker.yaml"
    entry = {"id": caller_id, "key_sha256": _HEX}
    config.write_text(json.dumps({"auth": {"api_keys": [entry]}}))  # JSON is YAML
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert f"{config}:" in str(caught.value)
    assert "auth.api_keys.0.id" in str(caught.value)


def test_api_key_id_with_double_dot_is_refused_at_config_load(tmp_path: Path) -> None:
    """An id such as a..b, which can never render into a prefix, is refused at load."""
    config = tmp_path / "broker.yaml"
    config.write_text(json.dumps({"auth": {"api_keys": [{"id": "a..b", "key_sha256": _HEX}]}}))
    with pytest.raises(ConfigError):
        load_settings(config)


# --- restricted keys: auth.api_keys[].allow ---

_ALLOW_KEY = f"auth:\n  api_keys:\n    - id: svc\n      key_sha256: '{_HEX}'\n      allow:\n"


def test_allow_restricts_routes_and_policies(tmp_path: Path) -> None:
    """allow: {routes, policies} loads as given; a key without allow has none."""
    text = _ALLOW_KEY + "        routes: [credentials]\n        policies: [service-uploads]\n"
    text += f"    - id: other\n      key_sha256: '{_HEX}'\n"
    settings = load_settings(_write(tmp_path, text), environ={})
    restricted, other = settings.auth.api_keys
    assert restricted.allow is not None
    assert (restricted.allow.routes, restricted.allow.policies) == (
        ("credentials",),
        ("service-uploads",),
    )
    assert other.allow is None


@pytest.mark.parametrize(
    ("allow", "line", "key", "fragment"),
    [
        ("        routes: [credential]\n", 6, "allow.routes.0", "'credentials', 'presign'"),
        ("        routes: []\n", 6, "allow.routes", "leave the key out"),
        ("        routes: [presign, presign]\n", 6, "allow.routes", "listed twice"),
        ("        policies: [Bad_Name]\n", 6, "allow.policies.0", "pattern"),
        ("        {}\n", 5, "allow", "give routes and/or policies"),
        ("        route: [credentials]\n", 6, "allow.route", "did you mean routes"),
    ],
)
def test_bad_allow_is_named_with_its_line(
    tmp_path: Path, allow: str, line: int, key: str, fragment: str
) -> None:
    """A misspelt route, an empty or repeated list, a bad policy name: file:line: key: problem."""
    path = _write(tmp_path, _ALLOW_KEY + allow)
    [problem] = _problems(path)
    assert problem.startswith(f"{path}:{line}: auth.api_keys.0.{key}: "), problem
    assert fragment in problem


# --- auth.mtls: one certificate name per caller ---

_ONE_NAME = "exactly one of uri, dns or common_name"


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ("[{id: a}]", _ONE_NAME),
        ("[{id: a, uri: 'spiffe://x/a', common_name: a}]", _ONE_NAME),
        ("[{id: a, dns: '*.example.com'}]", "should match pattern"),
        ("[{id: a, uri: 'not a uri'}]", "should match pattern"),
        ("[{id: a, dns: A.example.com}, {id: b, dns: a.EXAMPLE.com}]", "identifies more than one"),
    ],
    ids=["no-name", "two-names", "wildcard-dns", "bad-uri", "same-dns-twice"],
)
def test_mtls_callers_name_exactly_one_certificate_name(
    tmp_path: Path, entries: str, problem: str
) -> None:
    """Each auth.mtls entry names one uri, dns or common_name, no wildcard, none shared."""
    problems = _problems(_write(tmp_path, f"auth:\n  mtls: {entries}\n"))
    assert len(problems) == 1
    assert problem in problems[0]
    assert "auth.mtls" in problems[0]
