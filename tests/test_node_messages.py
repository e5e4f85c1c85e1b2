"""API messages: the server's hot-path decoder and encoder agree with
:class:`Request` and :class:`Response` byte for byte and error for error."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import RemoteProtocolError
from mesh.node.messages import (
    MAX_API_FRAME_BYTES,
    Request,
    Response,
    RpcType,
    decode_call,
    encode_answer,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=12,
)


@given(st.booleans(), values, st.text(max_size=30))
def test_encode_answer_is_the_framed_response(ok: bool, result: Any, error: str) -> None:
    encoder = wire.FrameEncoder(MAX_API_FRAME_BYTES)
    assert encode_answer(encoder, ok, result, error) == \
        wire.frame(Response(ok, result, error).encode(), MAX_API_FRAME_BYTES)


@given(st.one_of(
    st.binary(max_size=60),
    st.builds(lambda t, body: wire.encode(t, body), st.sampled_from([80, 81, 7]),
              st.one_of(values, st.tuples(st.text(max_size=70) | values,
                                          st.dictionaries(st.text(max_size=5), values,
                                                          max_size=3) | values).map(list))),
))
def test_decode_call_agrees_with_request_decode(data: bytes) -> None:
    try:
        request = Request.decode(data)
        expected: object = (request.method, request.params)
    except RemoteProtocolError as exc:
        expected = str(exc)  # the same message, for the same error answer
    try:
        got: object = decode_call(data)
    except RemoteProtocolError as exc:
        got = str(exc)
    assert got == expected


def test_decode_call_of_a_request() -> None:
    data = Request("kv_put", {"key": "k", "value": b"v"}).encode()
    assert decode_call(data) == ("kv_put", {"key": "k", "value": b"v"})
    with pytest.raises(RemoteProtocolError, match="not an API request"):
        decode_call(wire.encode(RpcType.RESPONSE, [True, None, ""]))
    with pytest.raises(RemoteProtocolError, match="malformed API request"):
        decode_call(wire.encode(RpcType.REQUEST, ["x" * 65, {}]))
