"""An OpenAI-compatible completions server backed by a transformers model, in a thread of the test process: what
`caft distill --server` is tested against without an engine (tests_engines/ runs the real vLLM).

It answers `/v1/models`, `/tokenize` and `/v1/completions` as vLLM does (prompts as token ids or text,
`return_token_ids`, `stop_token_ids`, the stop token among the returned ids but not in the text), greedily, one
request at a time. Its faults are switched on by the test: no `/tokenize`, no prompts as ids, no token ids in the
answer, HTTP 503 for the first requests, or a server that dies (closes every connection unanswered) after a number
of completions.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


@dataclass
class Behaviour:
    """What the server does; the counters say what it was asked."""

    name: str = "tiny"
    tokenize: bool = True
    takes_ids: bool = True
    returns_ids: bool = True
    busy_first: int = 0  # answer HTTP 503 to this many completion requests first
    dies_after: int | None = None  # after this many completions, close every connection unanswered
    completions: int = 0
    answered_max_tokens: list[int] = field(default_factory=list)
    refused_busy: int = 0


class ModelServer:
    """`model` and `tokenizer` served at `url` until `close()` (or the end of a `with` block)."""

    def __init__(self, model, tokenizer, behaviour: Behaviour | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.behaviour = behaviour or Behaviour()
        self._generate_lock = threading.Lock()
        self._count_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"served": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ids_of(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def complete(self, prompt_ids: list[int], max_tokens: int, stop_ids: list[int]) -> tuple[list[int], str]:
        """Greedy answer ids (the stop token included, as vLLM returns it) and finish reason."""
        with self._generate_lock:
            generated = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                                            eos_token_id=stop_ids, pad_token_id=0)[0, len(prompt_ids):].tolist()
        stop = next((i for i, token in enumerate(generated) if token in stop_ids), None)
        return (generated, "length") if stop is None else (generated[:stop + 1], "stop")


class _Handler(BaseHTTPRequestHandler):
    served: ModelServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._answer(200, {"object": "list", "data": [{"id": self.served.behaviour.name, "object": "model"}]})
        else:
            self._answer(404, {"error": {"message": f"no {self.path}"}})

    def do_POST(self) -> None:
        served, behaviour = self.served, self.served.behaviour
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize" and behaviour.tokenize:
            tokens = served.ids_of(payload["prompt"])
            self._answer(200, {"tokens": tokens, "count": len(tokens)})
            return
        if self.path != "/v1/completions":
            self._answer(404, {"error": {"message": f"no {self.path}"}})
            return
        with served._count_lock:
            if behaviour.dies_after is not None and behaviour.completions >= behaviour.dies_after:
                self.close_connection = True  # gone: the client sees the connection closed unanswered
                return
            if behaviour.refused_busy < behaviour.busy_first:
                behaviour.refused_busy += 1
                self._answer(503, {"error": {"message": "busy"}})
                return
            behaviour.completions += 1
        prompt = payload["prompt"]
        if isinstance(prompt, list) and not behaviour.takes_ids:
            self._answer(400, {"error": {"message": "prompt must be a string"}})
            return
        ids = prompt if isinstance(prompt, list) else served.ids_of(prompt)
        stop_ids = payload.get("stop_token_ids") or [served.tokenizer.eos_token_id]
        answer, finish = served.complete(ids, payload["max_tokens"], stop_ids)
        behaviour.answered_max_tokens.append(payload["max_tokens"])
        choice = {"index": 0, "text": served.tokenizer.decode(answer, skip_special_tokens=True),
                  "finish_reason": finish}
        if behaviour.returns_ids and payload.get("return_token_ids"):
            choice["token_ids"] = answer
        self._answer(200, {"object": "text_completion", "model": behaviour.name, "choices": [choice],
                           "usage": {"prompt_tokens": len(ids), "completion_tokens": len(answer)}})
