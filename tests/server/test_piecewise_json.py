"""`PiecewiseJSONResponse` (hwattn/server/streams.py): the bytes of `JSONResponse`, with the
choices encoded one at a time."""

import math

import pytest
from fastapi.responses import JSONResponse

from hwattn.server.streams import PiecewiseJSONResponse

DOCS = [
    {"id": "cmpl-1", "model": '"choices":"\x00x\x00"', "choices": [
        {"index": i, "text": "héllo \u2028 \x00", "logprobs": {"top": [{"a": -0.5}, None]}}
        for i in range(5)], "usage": {"prompt_tokens": 3}},
    {"choices": [1, 2]},
    {"choices": []},
    {"choices": [{"only": 1}]},
    {"status": "no choices"},
    [1, {"choices": [1, 2]}],
]


@pytest.mark.parametrize("doc", DOCS)
def test_same_bytes_as_json_response(doc):
    assert PiecewiseJSONResponse(doc).body == JSONResponse(doc).body


def test_nan_is_refused_as_json_response_refuses_it():
    with pytest.raises(ValueError):
        PiecewiseJSONResponse({"choices": [{"a": math.nan}, {}]})
