"""The OSS emulator's object store on disk, without HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_store import ObjectStore, etag_of
from tests.conftest import FakeClock


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> ObjectStore:
    return ObjectStore(tmp_path / "oss", clock)


def test_put_keeps_bytes_on_disk_and_attributes_in_memory(
    store: ObjectStore, tmp_path: Path, clock: FakeClock
) -> None:
    """put writes storage_dir/bucket/key and remembers type, x-oss-meta-*, ETag, time."""
    headers = {"Content-Type": "image/png", "X-Oss-Meta-Owner": "alice", "Other": "x"}
    stored = store.put("b", "u/a.png", b"png", headers, "Normal")
    assert (tmp_path / "oss" / "b" / "u" / "a.png").read_bytes() == b"png"
    assert store.read("b", "u/a.png") == b"png"
    assert stored.etag == etag_of(b"png")
    assert (stored.content_type, dict(stored.metadata)) == (
        "image/png",
        {"x-oss-meta-owner": "alice"},
    )
    assert stored.last_modified == clock()
    assert store.get("b", "u/a.png") == stored


def test_a_key_leaving_its_bucket_directory_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    """A key that resolves outside storage_dir/bucket is InvalidObjectName; nothing is written."""
    with pytest.raises(OssError) as raised:
        store.put("b", "../escape", b"x", {}, "Normal")
    assert raised.value.code == "InvalidObjectName"
    assert not (tmp_path / "oss" / "escape").exists()


def test_a_key_clashing_with_another_keys_path_is_refused(store: ObjectStore) -> None:
    """With a/b stored, a (now a directory) cannot be stored: InvalidObjectName."""
    store.put("b", "a/b", b"x", {}, "Normal")
    with pytest.raises(OssError) as raised:
        store.put("b", "a", b"y", {}, "Normal")
    assert raised.value.code == "InvalidObjectName"


def test_delete_removes_the_file_and_the_directories_it_empties(
    store: ObjectStore, tmp_path: Path
) -> None:
    """delete forgets the object and prunes empty parents up to the bucket's directory."""
    store.put("b", "x/y/z", b"1", {}, "Normal")
    store.delete("b", "x/y/z")
    assert store.get("b", "x/y/z") is None
    assert list((tmp_path / "oss" / "b").iterdir()) == []


def test_forbid_overwrite_refuses_an_existing_key_only(store: ObjectStore) -> None:
    """x-oss-forbid-overwrite: true is FileAlreadyExists for a stored key, nothing otherwise."""
    forbid = {"x-oss-forbid-overwrite": "true"}
    store.check_overwrite(forbid, "b", "k")
    store.put("b", "k", b"1", {}, "Normal")
    with pytest.raises(OssError) as raised:
        store.check_overwrite(forbid, "b", "k")
    assert raised.value.code == "FileAlreadyExists"


def test_list_returns_one_buckets_objects_in_key_order(store: ObjectStore) -> None:
    """list(bucket) yields (key, attributes) sorted by key, other buckets left out."""
    for key in ("b/2", "a", "b/1"):
        store.put("bucket", key, key.encode(), {}, "Normal")
    store.put("other", "a", b"x", {}, "Normal")
    assert [key for key, _ in store.list("bucket")] == ["a", "b/1", "b/2"]


def test_put_keeps_standard_headers_and_the_acl(store: ObjectStore) -> None:
    """Content-Disposition, Cache-Control, ... and x-oss-object-acl are stored; others not."""
    headers = {
        "content-disposition": "attachment",
        "Cache-Control": "no-cache",
        "x-oss-object-acl": "public-read",
        "Authorization": "OSS a:b",
    }
    stored = store.put("b", "k", b"", headers, "Normal")
    assert dict(stored.headers) == {
        "Content-Disposition": "attachment",
        "Cache-Control": "no-cache",
    }
    assert stored.acl == "public-read"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"x-oss-object-acl": "everyone"}, "InvalidArgument"),
        ({"Content-Disposition": "a\r\nSet-Cookie: x"}, "InvalidArgument"),
    ],
)
def test_put_refuses_invalid_acls_and_header_values(
    store: ObjectStore, headers: dict[str, str], code: str
) -> None:
    """An unknown ACL or a header value that is not printable ASCII is refused."""
    with pytest.raises(OssError) as raised:
        store.put("b", "k", b"", headers, "Normal")
    assert raised.value.code == code
    assert store.get("b", "k") is None


@pytest.mark.parametrize(
    ("value", "code"),
    [("true", "FileAlreadyExists"), ("TRUE", "FileAlreadyExists"), ("yes", "InvalidArgument")],
)
def test_check_overwrite(store: ObjectStore, value: str, code: str) -> None:
    """true (any case) on an existing key is FileAlreadyExists; neither true nor false is 400."""
    store.put("b", "k", b"", {}, "Normal")
    with pytest.raises(OssError) as raised:
        store.check_overwrite({"X-Oss-Forbid-Overwrite": value}, "b", "k")
    assert raised.value.code == code
    store.check_overwrite({"x-oss-forbid-overwrite": "false"}, "b", "k")
    store.check_overwrite({"x-oss-forbid-overwrite": "true"}, "b", "new")
