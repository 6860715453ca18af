import pytest

from voxbus.subjects import Event, Stage, Subjects


def test_layout():
    s = Subjects("vox")
    assert s.audio_in("abc") == "vox.sess.abc.audio.in"
    assert s.event("abc", Event.VAD) == "vox.sess.abc.evt.vad"
    assert s.work(Stage.STT) == "vox.work.stt"
    assert s.reply("abc", Stage.TTS, 3, 1) == "vox.sess.abc.reply.tts.3.1"
    assert Subjects.session_of(s.ctl("abc")) == "abc"
    assert Subjects.session_of(s.work(Stage.LLM)) is None


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "", "x" * 65, "a b"])
def test_session_ids_cannot_inject_wildcards(bad):
    with pytest.raises(ValueError):
        Subjects().audio_in(bad)
