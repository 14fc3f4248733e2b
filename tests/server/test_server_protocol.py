"""Request bodies: what the chat template gets, which prompt forms completions take, and the
stream chunk shapes OpenAI clients parse."""

import json
from types import SimpleNamespace

from atb_llm.entrypoints.openai.engine_loop import GenerationEvent
from atb_llm.entrypoints.openai.generation import Shape
from atb_llm.entrypoints.openai.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from atb_llm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, Usage
from atb_llm.entrypoints.openai.streaming import ChunkFormat
from atb_llm.runtime.sequence import TokenLogprob


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
    assert CompletionRequest(prompt="a b").prompts() == ["a b"]
    assert CompletionRequest(prompt=["only one"]).prompts() == ["only one"]
    assert CompletionRequest(prompt=[5, 6, 7]).prompts() == [[5, 6, 7]]
    assert CompletionRequest(prompt=[[5, 6], [7]]).prompts() == [[5, 6], [7]]  # lm-eval's batches
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]


class FakeTokenizer:
    """Byte-level BPE vocabulary of three tokens; "Ġ" is GPT-2's space."""

    added_tokens_decoder = {2: SimpleNamespace(content="<|end|>")}

    def get_vocab(self):
        return {"Hel": 0, "Ġlo": 1, "<|end|>": 2}


TEXTS = TokenTexts(FakeTokenizer())


def test_token_texts_and_logprob_shapes():
    assert [TEXTS.text(i) for i in range(3)] == ["Hel", " lo", "<|end|>"] and TEXTS.join([0, 1]) == "Hel lo"
    entries = [None, TokenLogprob(1, -0.5, [(1, -0.5), (0, -1.5)])]
    assert completion_logprobs([0, 1], entries, TEXTS, start=4) == {
        "tokens": ["Hel", " lo"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {" lo": -0.5, "Hel": -1.5}],
        "text_offset": [4, 7],
    }
    (one,) = chat_logprobs(entries[1:], TEXTS)["content"]
    assert one == {
        "token": " lo",
        "logprob": -0.5,
        "bytes": [32, 108, 111],
        "top_logprobs": [
            {"token": " lo", "logprob": -0.5, "bytes": [32, 108, 111]},
            {"token": "Hel", "logprob": -1.5, "bytes": [72, 101, 108]},
        ],
    }


def test_chunk_shapes():
    fmt = ChunkFormat("chatcmpl-1", "m", Shape(TEXTS, chat=True), include_usage=True, created=7)
    first = GenerationEvent("Hel", 1)
    (opening,) = [json.loads(c.removeprefix("data: ")) for c in fmt.opening("hi", None, first)]
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    (text,) = [json.loads(c.removeprefix("data: ")) for c in fmt.event(first)]
    assert text["choices"][0] == {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    finish, usage = [json.loads(c.removeprefix("data: ")) for c in fmt.closing("stop", Usage.of(3, 2))]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert finish["usage"] is None and usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    plain = ChunkFormat("cmpl-1", "m", Shape(TEXTS), include_usage=False)
    assert plain.opening("hi", None, first) == []
    (last,) = [json.loads(c.removeprefix("data: ")) for c in plain.closing("length", Usage.of(3, 2))]
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}
    }  # fmt: skip


def test_completion_stream_echoes_the_prompt_with_running_offsets():
    fmt = ChunkFormat("cmpl-1", "m", Shape(TEXTS, logprobs=1, echo=True), include_usage=False)
    stream = SimpleNamespace(prompt_ids=[0, 1])
    first = GenerationEvent(" lo", 1, logprobs=[TokenLogprob(1, -0.1, [(1, -0.1)])])
    first.prompt_logprobs = [None, TokenLogprob(1, -2.0, [(0, -0.2)])]
    (echo,) = [json.loads(c.removeprefix("data: ")) for c in fmt.opening([0, 1], stream, first)]
    assert echo["choices"][0]["text"] == "Hel lo"
    assert echo["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]
    (gen,) = [json.loads(c.removeprefix("data: ")) for c in fmt.event(first)]
    assert gen["choices"][0]["text"] == " lo" and gen["choices"][0]["logprobs"]["text_offset"] == [6]
