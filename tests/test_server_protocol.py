"""Request bodies: what the chat template gets, which prompt forms completions take, and the
stream chunk shapes OpenAI clients parse."""

import json

from examples.server.generation import ChunkFormat
from examples.server.protocol import ChatCompletionRequest, CompletionRequest, Usage


def test_chat_messages_for_the_template():
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "stop": "END",
            "unknown_field": 1,
        }
    )
    assert body.chat() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert body.stop_strings() == ("END",) and (body.temperature, body.top_p, body.n) == (1.0, 1.0, 1)


def test_completion_prompt_forms():
    assert CompletionRequest(prompt="a b").prompt == "a b"
    assert CompletionRequest(prompt=["only one"]).prompt == "only one"
    assert CompletionRequest(prompt=[5, 6, 7]).prompt == [5, 6, 7]


def test_chunk_shapes():
    fmt = ChunkFormat("chatcmpl-1", "m", chat=True, include_usage=True, created=7)
    (opening,) = [json.loads(c.removeprefix("data: ")) for c in fmt.opening()]
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = json.loads(fmt.text("Hel").removeprefix("data: "))
    assert text["choices"][0] == {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    finish, usage = [json.loads(c.removeprefix("data: ")) for c in fmt.closing("stop", Usage.of(3, 2))]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert finish["usage"] is None and usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    plain = ChunkFormat("cmpl-1", "m", chat=False, include_usage=False)
    assert plain.opening() == []
    (last,) = [json.loads(c.removeprefix("data: ")) for c in plain.closing("length", Usage.of(3, 2))]
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
