"""The cache key's rule, pinned as a Hypothesis property (it moves to tests/credentials/).

The other hostile-input tests that lived here now sit with the module whose
rule they pin: tests/http/test_input_limits.py, tests/test_uploads.py,
tests/test_auth.py, tests/test_config.py and tests/test_oidc.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.credentials.cache import CacheKey
from broker.models import AssumeRoleRequest

_BOUNDED = settings(max_examples=200, deadline=None, database=None)


_assume_requests = st.builds(
    AssumeRoleRequest,
    role_arn=st.sampled_from(["acs:ram::1:role/a", "acs:ram::1:role/b"]),
    policy=st.sampled_from(['{"Version":"1"}', '{"Version":"1" }']) | st.text(min_size=1),
    duration_seconds=st.sampled_from([900, 3600]),
    role_session_name=st.sampled_from(["alice", "bob"]),
    external_id=st.sampled_from([None, "x", ""]),
)


@_BOUNDED
@given(first=_assume_requests, second=_assume_requests)
def test_cache_keys_are_equal_iff_all_five_fields_are(
    first: AssumeRoleRequest, second: AssumeRoleRequest
) -> None:
    """CacheKey.for_request: equal (and equally hashed) exactly when every field is equal."""
    fields = ("role_arn", "policy", "duration_seconds", "external_id", "role_session_name")
    same = all(getattr(first, name) == getattr(second, name) for name in fields)
    key_a, key_b = CacheKey.for_request(first), CacheKey.for_request(second)
    assert (key_a == key_b) == same
    if same:
        assert hash(key_a) == hash(key_b)
