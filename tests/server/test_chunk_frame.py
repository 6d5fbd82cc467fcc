"""A stream chunk made from its frame (the envelope encoded once a stream) is the event `sse` makes of the whole
chunk, byte for byte."""

import json

import pytest

from server.serving import ChunkFrame, sse

ENVELOPE = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "mamba \"x\" ü",
            "scale_bucket": "4k", "scale_beyond_largest": False, "scale_method": None}
CHOICES = [
    {"index": 0, "text": "", "logprobs": None, "finish_reason": None, "stop_reason": None},
    {"index": 3, "text": "line\nbreak \"quoted\" \\ ü 漢字 \u2028 \x00", "logprobs": None, "finish_reason": "stop",
     "stop_reason": 7},
    {"index": 1, "delta": {"role": "assistant", "content": "{\"choices\": []}"}, "finish_reason": None},
]


@pytest.mark.parametrize("choice", CHOICES)
def test_a_chunk_from_the_frame_is_the_whole_chunks_event(choice):
    frame = ChunkFrame({**ENVELOPE, "choices": [ChunkFrame.MARK]})
    event = frame.event(choice)
    assert event == sse({**ENVELOPE, "choices": [choice]})
    assert json.loads(event.removeprefix(b"data: "))["choices"] == [choice]
