"""The wire schema: every frame round-trips; bad bytes are refused with a precise error."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxbus.wire import (
    FRAME_TYPES,
    MAX_FRAME_BYTES,
    SCHEMA_VERSION,
    AudioIn,
    LlmRequest,
    Transcript,
    TtsRequest,
    WireError,
    decode,
    encode,
)

audio_in = st.builds(
    AudioIn, seq=st.integers(0, 2**40), ts_us=st.integers(0, 2**62),
    sample_rate=st.sampled_from([8000, 16000, 48000]),
    pcm=st.binary(max_size=1920).map(lambda b: b[: len(b) // 2 * 2]),
)
transcript = st.builds(
    Transcript, text=st.text(max_size=200), final=st.booleans(), seq=st.integers(0, 2**31),
    ts_us=st.integers(0, 2**62), language=st.none() | st.sampled_from(["en", "fr"]),
)
json_leaf = st.none() | st.booleans() | st.integers(-2**31, 2**31) | st.text(max_size=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                           "content": st.text(max_size=50)}), max_size=5)
llm_request = st.builds(
    LlmRequest, session=st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
    turn=st.integers(0, 1000), messages=messages,
    settings=st.dictionaries(st.text(min_size=1, max_size=8), json_leaf, max_size=3),
)


@given(st.one_of(audio_in, transcript, llm_request))
def test_round_trip(frame):
    assert decode(encode(frame)) == frame


def test_every_tag_is_unique_and_named():
    assert len({cls.TAG for cls in FRAME_TYPES.values()}) == len(FRAME_TYPES)
    assert all(tag == cls.TAG for tag, cls in FRAME_TYPES.items())


@given(st.binary(max_size=300))
def test_garbage_is_a_wire_error_never_a_crash(data):
    try:
        decode(data)
    except WireError as e:
        assert e.code in {"malformed", "version", "unknown_tag", "invalid"}


def test_wrong_version_is_named():
    data = msgpack.packb([SCHEMA_VERSION + 1, 1, {}])
    with pytest.raises(WireError, match="schema version 2") as err:
        decode(data)
    assert err.value.code == "version"


def test_unknown_tag():
    with pytest.raises(WireError) as err:
        decode(msgpack.packb([SCHEMA_VERSION, 9999, {}]))
    assert err.value.code == "unknown_tag"


def test_invalid_field_names_class_and_field():
    body = {"seq": -1, "ts_us": 0, "sample_rate": 16000, "pcm": b""}
    with pytest.raises(WireError, match=r"AudioIn\.seq") as err:
        decode(msgpack.packb([SCHEMA_VERSION, int(AudioIn.TAG), body], use_bin_type=True))
    assert err.value.code == "invalid"


def test_unknown_field_refused():
    body = {"seq": 1, "ts_us": 0, "sample_rate": 16000, "pcm": b"", "evil": 1}
    with pytest.raises(WireError, match="evil"):
        decode(msgpack.packb([SCHEMA_VERSION, int(AudioIn.TAG), body], use_bin_type=True))


def test_wrong_type_refused_not_coerced():
    body = {"seq": "1", "ts_us": 0, "sample_rate": 16000, "pcm": b""}
    with pytest.raises(WireError, match="seq"):
        decode(msgpack.packb([SCHEMA_VERSION, int(AudioIn.TAG), body], use_bin_type=True))


def test_oversized_refused_both_ways():
    with pytest.raises(WireError) as err:
        decode(b"\x00" * (MAX_FRAME_BYTES + 1))
    assert err.value.code == "oversized"
    big = AudioIn(seq=0, ts_us=0, sample_rate=16000, pcm=b"\x00" * MAX_FRAME_BYTES)
    with pytest.raises(WireError):
        encode(big)


def test_tts_request_text_bounds():
    with pytest.raises(ValueError):
        TtsRequest(session="s", turn=0, index=0, text="")


def test_odd_length_audio_is_refused():
    bad = msgpack.packb([SCHEMA_VERSION, int(AudioIn.TAG), {
        "seq": 0, "ts_us": 0, "sample_rate": 16000, "pcm": b"\x00" * 641}], use_bin_type=True)
    with pytest.raises(WireError, match="AudioIn.pcm.*odd"):
        decode(bad)
