"""broker.downloads: the response-* overrides a presigned GET may carry, checked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.downloads import ACTIVE_CONTENT_TYPES, response_overrides
from broker.errors import AccessDenied, RequestInvalid
from broker.policies import load_policy_file
from tests.conftest import POLICIES_DIR

REPORTS = load_policy_file(POLICIES_DIR / "reports-read.yaml")  # lists no content_types
AVATARS = load_policy_file(POLICIES_DIR / "avatar-upload.yaml")  # lists image types


def test_fields_become_their_query_parameters() -> None:
    """Each field given becomes its response-* parameter, unchanged; absent ones are left out."""
    query = response_overrides(
        REPORTS,
        {
            "response_content_disposition": "inline",
            "response_content_type": "text/csv",
            "response_cache_control": None,
        },
    )
    assert query == {"response-content-disposition": "inline", "response-content-type": "text/csv"}


@pytest.mark.parametrize("content_type", sorted(ACTIVE_CONTENT_TYPES))
def test_active_types_are_refused_unless_listed(content_type: str) -> None:
    """A type a browser runs as a page or script is 403 unless content_types lists it."""
    with pytest.raises(AccessDenied, match="page or script"):
        response_overrides(REPORTS, {"response_content_type": content_type})
    listed = REPORTS.model_copy(update={"content_types": (content_type,)})
    assert response_overrides(listed, {"response_content_type": content_type})


def test_listed_content_types_bound_the_override() -> None:
    """With content_types, only those (with an optional charset) are allowed."""
    assert response_overrides(AVATARS, {"response_content_type": "image/png"})
    with pytest.raises(AccessDenied, match="image/png"):
        response_overrides(AVATARS, {"response_content_type": "text/plain"})


_STARTS = ["", "inline", 'attachment; filename="', "text/csv; charset=", "private, max-age="]
_HEADER_VALUES = st.tuples(
    st.sampled_from(_STARTS),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40),
    st.sampled_from(["", '"', "0"]),
).map("".join)


@given(
    field=st.sampled_from(
        ["response_content_disposition", "response_content_type", "response_cache_control"]
    ),
    value=_HEADER_VALUES,
)
def test_any_accepted_value_is_a_plain_header_value(field: str, value: str) -> None:
    """Whatever is accepted is printable ASCII: no CR, LF, NUL or other control, no non-ASCII."""
    try:
        query = response_overrides(REPORTS, {field: value})
    except (RequestInvalid, AccessDenied):
        return
    [accepted] = query.values()
    assert accepted == value
    assert accepted.isascii()
    assert accepted.isprintable()
