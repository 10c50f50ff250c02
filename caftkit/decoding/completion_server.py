"""A client of an OpenAI-compatible completions server (vLLM, SGLang, TGI, llama.cpp's server).

`caft distill --server` sends its prompts here. The engine lives in an environment of its own (vLLM pins its own
transformers), so caftkit talks to it over HTTP with the standard library only. A request that fails for a reason
that passes (no connection, a timeout, HTTP 5xx or 429) is tried again after a wait that doubles each time; any
other refusal (a 4xx) is final, since sending the same request again would be refused again.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

# The longest wait between two tries of one request, in seconds.
MAX_BACKOFF_S = 30.0


class ServerError(OSError):
    """A server that does not answer, refuses a request, or answers something that is not a completion."""


class NotServed(ServerError):
    """The server has no such endpoint (HTTP 404 or 405)."""


@dataclass
class Completion:
    """One answer of the server: its text, its token ids where the server returns them, why it stopped
    (`stop` or `length`), and the count of generated tokens it reports."""

    text: str
    token_ids: list[int] | None
    finish_reason: str | None
    completion_tokens: int | None
    prompt_tokens: int | None


class CompletionServer:
    """An OpenAI-compatible server at `url` (its base, e.g. http://127.0.0.1:8000), asked for `model`.

    `retries` tries per request on passing failures, waiting `backoff_s`, then twice as long each time (at most
    `MAX_BACKOFF_S`). `stop()` makes every waiting or later try give up at once: once one request has failed for
    good, the others do not go on retrying against a server that is gone.
    """

    def __init__(self, url: str, model: str | None = None, timeout_s: float = 600.0, retries: int = 8,
                 backoff_s: float = 1.0):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.prompt_as_ids = True
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.retried = 0

    def stop(self) -> None:
        """Give up every request still waiting to be tried again."""
        self._stopping.set()

    def _send(self, path: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            body = response.read()
        try:
            answer = json.loads(body)
        except ValueError as error:
            raise ServerError(f"{self.url}{path}: the answer is not JSON ({error})") from None
        if not isinstance(answer, dict):
            raise ServerError(f"{self.url}{path}: the answer is not a JSON object")
        return answer

    def request(self, path: str, payload: dict[str, Any] | None = None, tries: int | None = None) -> dict[str, Any]:
        """The JSON answer of `path` (GET without `payload`, else POST), tried up to `tries` times (default
        `retries`) while it fails for a passing reason. A final refusal raises `ServerError` with the server's
        message; HTTP 404 and 405 raise `NotServed`."""
        tries = self.retries if tries is None else tries
        for attempt in range(tries):
            if self._stopping.is_set():
                raise ServerError(f"{self.url}{path}: given up (another request failed)")
            try:
                return self._send(path, payload)
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code in (404, 405):
                    raise NotServed(f"{self.url}{path}: HTTP {error.code}{detail}") from None
                if error.code < 500 and error.code != 429:
                    raise ServerError(f"{self.url}{path}: HTTP {error.code}{detail}") from None
                reason = f"HTTP {error.code}{detail}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                reason = str(getattr(error, "reason", None) or error) or type(error).__name__
            if attempt + 1 < tries:
                with self._lock:
                    self.retried += 1
                if self._stopping.wait(min(self.backoff_s * 2 ** attempt, MAX_BACKOFF_S)):
                    raise ServerError(f"{self.url}{path}: given up (another request failed)")
        raise ServerError(f"{self.url}{path}: no answer after {tries} tries ({reason})")

    def served_models(self, tries: int = 1) -> list[str]:
        """The names of the models the server serves (`/v1/models`)."""
        answer = self.request("/v1/models", tries=tries)
        models = answer.get("data")
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in models):
            raise ServerError(f"{self.url}/v1/models: the answer lists no models")
        return [m["id"] for m in models]

    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids of `text` (no special tokens added), or None where it has no `/tokenize`."""
        try:
            answer = self.request("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        except NotServed:
            return None
        tokens = answer.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerError(f"{self.url}/tokenize: the answer holds no token ids")
        return tokens

    def complete(self, prompt_ids: list[int], prompt_text: str, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 tries: int | None = None, prompt_as_ids: bool | None = None) -> Completion:
        """One completion of the prompt (sent as token ids when `prompt_as_ids`, by default the server's
        `prompt_as_ids`, else as text with no special tokens added), up to `max_tokens` new tokens.
        `stop_token_ids` and `return_token_ids` are extensions that vLLM and SGLang read and other servers
        ignore."""
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt_ids if (self.prompt_as_ids if prompt_as_ids is None else prompt_as_ids) else prompt_text,
            "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "n": 1, "stream": False,
            "return_token_ids": True, "add_special_tokens": False, "skip_special_tokens": True,
        }
        if seed is not None:
            payload["seed"] = seed
        if stop_token_ids:
            payload["stop_token_ids"] = stop_token_ids
        return parse_completion(self.request("/v1/completions", payload, tries=tries), self.url)


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The server's own message of an HTTP error, on one line and short."""
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        parsed = json.loads(body)
        message = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        if isinstance(message, dict):
            message = message.get("message", message)
        body = str(message)
    except ValueError:
        pass
    body = " ".join(body.split())
    return f": {body[:300]}" if body else ""


def parse_completion(answer: dict[str, Any], url: str) -> Completion:
    """The first choice of a `/v1/completions` answer."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError(f"{url}/v1/completions: the answer holds no choices")
    choice = choices[0]
    text = choice.get("text")
    if not isinstance(text, str):
        raise ServerError(f"{url}/v1/completions: the answer's choice holds no text")
    token_ids = choice.get("token_ids")
    if not (isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)):
        token_ids = None
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    counts = {key: usage.get(key) if isinstance(usage.get(key), int) else None
              for key in ("completion_tokens", "prompt_tokens")}
    return Completion(text=text, token_ids=token_ids, finish_reason=choice.get("finish_reason"), **counts)
