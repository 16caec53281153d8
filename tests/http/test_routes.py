"""broker.http.routes: the request body decoder's orjson fast path reads what the slow one reads."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from broker.http.routes import _DECODER, _fast_decode

_BODIES = [
    b'{"policy": "p", "key": "a/b.txt", "content_length": 1024, "method": "PUT"}',
    b'{"policy":"p","metadata":{"a":"1","b":"2"},"headers":{"x-oss-forbid-overwrite":"true"}}',
    b'{"policy": "p", "policy": "q"}',
    b'{"policy": "p", "metadata": {"a": "1", "a": "2"}}',
    b'{"\\u0070olicy": "p", "policy": "q"}',
    b'{"callback": {"url": "http://x/cb", "url": "http://y/cb", "body": "b"}}',
    b'{"a": "x:y", "a": "z"}',
    b'{"a": 18446744073709551616}',
    b'{"a": -9223372036854775809}',
    b'{"a": 1.0}',
    b'{"a": 1e400}',
    b'{"a": NaN}',
    b'{"a": [1, 2]}',
    b'{"a": {"b": {"c": 1}}}',
    b'{"a": "\\ud800"}',
    b'{"a": "\\ud83d\\ude00", "b": true, "c": null, "d": false}',
    b'\xef\xbb\xbf{"a": 1}',
    '{"a": "é"}'.encode("utf-16"),
    b'{"a": "\xed\xa0\x80"}',
    b"[1]",
    b'"s"',
    b"{}",
    b" { } ",
]


def _slow(raw: bytes) -> Any:
    try:
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except Exception as err:  # the caller's 400, whatever the reason
        return type(err)


@pytest.mark.parametrize("raw", _BODIES)
def test_fast_decode_reads_what_the_decoder_reads_or_defers(raw: bytes) -> None:
    """_fast_decode returns exactly the slow decoder's object, or None to let it decide."""
    fast = _fast_decode(raw)
    if fast is not None:
        slow = _slow(raw)
        assert fast == slow
        assert [type(v) for v in fast.values()] == [type(v) for v in slow.values()]


@pytest.mark.parametrize(
    "raw",
    [_BODIES[2], _BODIES[3], _BODIES[4], _BODIES[5], _BODIES[6], b'{"a": 1, "a": 1}'],
)
def test_fast_decode_never_accepts_a_repeated_field(raw: bytes) -> None:
    """A body repeating a field, at any depth, always goes to the decoder that refuses it."""
    assert _fast_decode(raw) is None


def test_fast_decode_agrees_on_random_bodies() -> None:
    """Random small bodies (colons, escapes, repeats, nesting): the same object or deferred."""
    rng = random.Random(14)
    atoms = ['"a"', '"b"', '"a:b"', '"\\u0061"', "1", "-0", "true", "null", '"é"', "2.5"]
    for _ in range(3000):
        pairs = []
        for _ in range(rng.randint(0, 4)):
            value = rng.choice(atoms)
            if rng.random() < 0.3:
                inner = [f"{rng.choice(atoms[:4])}: {rng.choice(atoms)}" for _ in range(2)]
                value = "{" + ", ".join(inner) + "}"
            pairs.append(f"{rng.choice(atoms[:4])}:{value}")
        raw = ("{" + ",".join(pairs) + "}").encode()
        fast = _fast_decode(raw)
        assert fast is None or fast == _slow(raw), raw


def test_fast_decode_takes_the_usual_body() -> None:
    """A usual presign body (no colon in any value) takes the fast path."""
    assert _fast_decode(_BODIES[0]) == json.loads(_BODIES[0])
