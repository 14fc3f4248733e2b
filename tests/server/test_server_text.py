"""Streaming text: never a broken UTF-8 character, never text from a stop string on, and the
deltas add up to the final text."""

import pytest
from tiny import build_tokenizer

from atb_llm.entrypoints.openai.text_stream import TextStream, stop_prefix_len


@pytest.mark.parametrize(
    "text,stop,expected",
    [
        ("hello wor", ("world",), 3),
        ("hello w", ("world", "xyz"), 1),
        ("hello", ("world",), 0),
        ("abab", ("abc",), 2),
        ("abc", ("abc",), 0),  # a whole stop string is the engine's to cut, not a prefix to hold
        ("x</s", ("</s>", "s"), 3),
        ("anything", (), 0),
    ],
)
def test_stop_prefix_len(text, stop, expected):
    assert stop_prefix_len(text, stop) == expected


def test_split_character_is_held_until_complete(tmp_path):
    tok = build_tokenizer(tmp_path)  # byte-level BPE trained on ASCII: "é" and "你" are byte tokens
    ids = tok.encode("caf\u00e9 \u4f60!", add_special_tokens=False)
    stream, sent = TextStream(), []
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        delta = stream.delta(text, finished=n == len(ids))
        assert "\ufffd" not in delta, (n, text)
        sent.append(delta)
    assert "".join(sent) == "caf\u00e9 \u4f60!"
    assert sent.count("") >= 3  # the lead bytes of é (1) and 你 (2) sent nothing


def test_stop_string_prefix_is_held_then_released_or_cut():
    stream = TextStream(stop=("END",))
    assert [stream.delta(t, False) for t in ("a", "a E", "a EN", "a ENx")] == ["a", " ", "", "ENx"]
    stream = TextStream(stop=("END",))
    assert [stream.delta(t, False) for t in ("a", "a E", "a EN")] == ["a", " ", ""]
    # the engine finishes on "a END..." and cuts its text before the stop string
    assert stream.delta("a ", True) == "" and stream.sent == "a "


def test_finished_text_is_sent_whole():
    stream = TextStream(stop=("zz",))
    assert stream.delta("ab z", False) == "ab "
    assert stream.delta("ab z\ufffd", True) == "z\ufffd"  # a length cut mid-character ends as it decodes
