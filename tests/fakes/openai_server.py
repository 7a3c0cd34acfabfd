"""A real local HTTP server speaking the OpenAI (and Cohere rerank) wire protocol, for tests.

Only the network is faked: the code under test builds its real SDK or httpx client and
talks HTTP/1.1 to 127.0.0.1. Each request may be given a scripted fault (a status, a
delay, a broken body, a dropped connection), and streams record how many chunks
actually reached the socket, so a test can prove that a client disconnect stops the
upstream.

    with FakeOpenAIServer(dimensions=16) as server:
        server.enqueue(Fault(status=429, retry_after=0.05))
        backend = OpenAIEmbeddings(model="m", base_url=server.base_url)
        ...
        assert [r.path for r in server.requests] == ["/v1/embeddings"] * 2

As a pytest fixture:

    @pytest.fixture
    def openai_server() -> Iterator[FakeOpenAIServer]:
        with FakeOpenAIServer() as server:
            yield server

Endpoints: POST /v1/embeddings, POST /v1/chat/completions (streaming and not),
GET /v1/models, POST /rerank (also /v1/rerank; Cohere, Jina or TEI shape).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

DEFAULT_REPLY = "The quick brown fox jumps over the lazy dog."

# What a client that hung up looks like from the server's side of the socket.
_DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour; the next request (to any endpoint) consumes it.

    Fields combine: Fault(delay=0.5, status=503) waits, then answers 503. The chat
    fields override the server's settings for that one streaming request.
    """

    status: int | None = None
    retry_after: float | str | None = None  # sent as Retry-After: seconds or an HTTP date
    retry_after_ms: float | None = None  # sent as retry-after-ms, as OpenAI does
    message: str | None = None  # the error body's message
    delay: float = 0.0  # sleep before answering, to trip client timeouts
    malformed_json: bool = False  # 200 with a truncated JSON body (or SSE event)
    disconnect: bool = False  # close the connection without answering
    first_token_delay: float | None = None
    token_delay: float | None = None
    cut_after_tokens: int | None = None


class RecordedRequest(NamedTuple):
    path: str
    body: Any  # the decoded JSON body, None for GET
    headers: dict[str, str]  # lower-cased names


@dataclass
class StreamRecord:
    """What one streamed chat response did on the wire."""

    tokens_planned: int
    chunks_written: int = 0  # content chunks that reached the socket
    completed: bool = False  # the usage chunk, [DONE] and the final HTTP chunk were sent
    cut: bool = False  # the server cut it on purpose (cut_after_tokens)
    closed_early: bool = False  # the client went away before the stream ended
    done: threading.Event = field(default_factory=threading.Event, repr=False)


def fake_embedding(text: str, dimensions: int) -> list[float]:
    """The server's deterministic, deliberately un-normalised vector for text."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    # Scaled by 3 so a client that forgets to L2-normalise is caught by its tests.
    return [3.0 * rng.uniform(-1.0, 1.0) for _ in range(dimensions)]


def word_overlap(query: str, document: str) -> float:
    """The fake reranker's score: the share of the query's words found in the document."""
    query_words = set(_words(query))
    if not query_words:
        return 0.0
    return len(query_words & set(_words(document))) / len(query_words)


def split_tokens(text: str) -> list[str]:
    """Split a reply into the pieces streamed as chunks; joining them gives the text back."""
    return re.findall(r"\s*\S+|\s+$", text)


class FakeOpenAIServer:
    """An OpenAI-compatible HTTP server on 127.0.0.1 in a background thread."""

    def __init__(
        self,
        *,
        dimensions: int = 8,
        chat_reply: str | Callable[[list[dict[str, Any]]], str] = DEFAULT_REPLY,
        first_token_delay: float = 0.0,
        token_delay: float = 0.0,
        cut_after_tokens: int | None = None,
        embedding_usage: bool = True,
        stream_usage: bool = True,
        rerank_shape: str | None = None,
        models: Sequence[str] = ("fake-embedding", "fake-chat"),
    ) -> None:
        self.dimensions = dimensions
        # A string, or a callable given the request's messages and returning the reply.
        self.chat_reply = chat_reply
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.cut_after_tokens = cut_after_tokens
        # False drops `usage` from embedding responses, as some compatible servers do.
        self.embedding_usage = embedding_usage
        # False ignores stream_options.include_usage, as some compatible servers do.
        self.stream_usage = stream_usage
        # "cohere", "jina" or "tei"; None answers in the shape the request used.
        self.rerank_shape = rerank_shape
        self.models = list(models)
        self.requests: list[RecordedRequest] = []
        self.streams: list[StreamRecord] = []
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server root, e.g. http://127.0.0.1:PORT."""
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients are given, e.g. http://127.0.0.1:PORT/v1."""
        return self.url + "/v1"

    @property
    def rerank_url(self) -> str:
        """The full URL of the Cohere-style rerank endpoint."""
        return self.url + "/rerank"

    @property
    def stream_closed_early(self) -> bool:
        """Whether the most recent stream lost its client before it finished."""
        return bool(self.streams) and self.streams[-1].closed_early

    def start(self) -> FakeOpenAIServer:
        """Bind a free port and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-openai-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and wake sleeping handlers."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def enqueue(self, *faults: Fault) -> None:
        """Script the next requests: each fault is used by exactly one request, in order."""
        with self._lock:
            self._faults.extend(faults)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests whose path is exactly `path`."""
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def wait_for_stream(self, index: int = -1, timeout: float = 5.0) -> StreamRecord:
        """Block until a streamed response has finished, been cut, or lost its client."""
        deadline = time.monotonic() + timeout
        while not self.streams:
            if time.monotonic() > deadline:
                raise TimeoutError("no stream was started")
            time.sleep(0.005)
        record = self.streams[index]
        if not record.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the stream did not finish in time")
        return record

    # Called from handler threads.

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_fault(self) -> Fault:
        with self._lock:
            return self._faults.popleft() if self._faults else Fault()

    def _track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _reply_for(self, messages: list[dict[str, Any]]) -> str:
        reply = self.chat_reply
        return reply(messages) if callable(reply) else reply


class _HTTPServer(ThreadingHTTPServer):
    # Handler threads may be asleep in a scripted delay; stop() must not wait for them.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, fake: FakeOpenAIServer):
        self.fake = fake
        super().__init__(address, handler)


class _StopServing(Exception):
    """The server is shutting down; abandon the response."""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 gives keep-alive and chunked streaming, as the real API does.
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    @property
    def fake(self) -> FakeOpenAIServer:
        return self.server.fake

    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.fake._track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        # Silence the per-request stderr line; tests read server.requests instead.
        pass

    def do_GET(self) -> None:
        self._dispatch(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._send_json(400, _error("request body is not JSON", "invalid_request_error"))
            return
        self._dispatch(body)

    def _dispatch(self, body: Any) -> None:
        path = urlsplit(self.path).path
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.fake._record(RecordedRequest(path, body, headers))
        fault = self.fake._next_fault()
        try:
            if fault.delay:
                self._pause(fault.delay, watch_client=False)
            if fault.disconnect:
                self._hang_up()
                return
            if fault.status is not None:
                self._send_fault(fault)
                return
            route = _ROUTES.get((self.command, path))
            if route is None:
                message = f"no route for {self.command} {path}"
                self._send_json(404, _error(message, "invalid_request_error"))
                return
            route(self, body, fault)
        except _DISCONNECTED:
            # The client gave up (its timeout fired, or it closed the stream): expected.
            self.close_connection = True
        except _StopServing:
            self.close_connection = True

    # Endpoints.

    def _embeddings(self, body: dict[str, Any], fault: Fault) -> None:
        if fault.malformed_json:
            self._send_raw(200, b'{"object": "list", "data": [{"embedding": [0.1,', "json")
            return
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if not texts or any(not isinstance(text, str) or not text for text in texts):
            message = "input must be a non-empty string or array of non-empty strings"
            self._send_json(400, _error(message, "invalid_request_error"))
            return
        dimensions = int(body.get("dimensions") or self.fake.dimensions)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = fake_embedding(text, dimensions)
            embedding: Any = vector
            if as_base64:
                # The API's base64 format: little-endian float32, as numpy.frombuffer reads it.
                packed = struct.pack(f"<{len(vector)}f", *vector)
                embedding = base64.b64encode(packed).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        response: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
        if self.fake.embedding_usage:
            tokens = sum(len(text.split()) for text in texts)
            response["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._send_json(200, response)

    def _chat_completions(self, body: dict[str, Any], fault: Fault) -> None:
        messages = list(body.get("messages") or [])
        tokens = split_tokens(self.fake._reply_for(messages))
        finish_reason = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is not None and len(tokens) > int(limit):
            tokens, finish_reason = tokens[: int(limit)], "length"
        prompt_tokens = sum(len(str(message.get("content", "")).split()) for message in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        completion_id = f"chatcmpl-fake{len(self.fake.requests)}"
        model = body.get("model") or "fake-chat"
        if body.get("stream"):
            self._stream_chat(body, fault, tokens, finish_reason, usage, completion_id, model)
            return
        if fault.malformed_json:
            self._send_raw(200, b'{"id": "chatcmpl-broken", "choices": [', "json")
            return
        message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        self._send_json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
                "system_fingerprint": None,
            },
        )

    def _stream_chat(
        self,
        body: dict[str, Any],
        fault: Fault,
        tokens: list[str],
        finish_reason: str,
        usage: dict[str, int],
        completion_id: str,
        model: str,
    ) -> None:
        fake = self.fake
        first_token_delay = _pick(fault.first_token_delay, fake.first_token_delay)
        token_delay = _pick(fault.token_delay, fake.token_delay)
        cut_after = fault.cut_after_tokens
        if cut_after is None:
            cut_after = fake.cut_after_tokens
        stream_options = body.get("stream_options") or {}
        include_usage = fake.stream_usage and bool(stream_options.get("include_usage"))
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                # With include_usage the API sends "usage": null on every other chunk.
                payload["usage"] = None
            payload.update(extra)
            return json.dumps(payload)

        def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

        record = StreamRecord(tokens_planned=len(tokens))
        with fake._lock:
            fake.streams.append(record)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if fault.malformed_json:
                self._write_event('{"id": "chatcmpl-broken", "choices": [')
                self._end_chunked()
                return
            # Headers and the role chunk come at once; the wait is for the first token,
            # as with a real server doing prefill.
            self._write_event(chunk(delta({"role": "assistant", "content": ""})))
            for index, token in enumerate(tokens):
                if cut_after is not None and index >= cut_after:
                    record.cut = True
                    self._hang_up()
                    return
                pause = first_token_delay if index == 0 else token_delay
                if pause:
                    self._pause(pause, watch_client=True)
                self._write_event(chunk(delta({"content": token})))
                record.chunks_written += 1
            self._write_event(chunk(delta({}, finish_reason)))
            if include_usage:
                self._write_event(chunk([], usage=usage))
            self._write_event("[DONE]")
            self._end_chunked()
            record.completed = True
        except _DISCONNECTED:
            record.closed_early = True
            raise
        finally:
            record.done.set()

    def _models(self, body: Any, fault: Fault) -> None:
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "fake"}
            for model in self.fake.models
        ]
        self._send_json(200, {"object": "list", "data": data})

    def _rerank(self, body: dict[str, Any], fault: Fault) -> None:
        if fault.malformed_json:
            self._send_raw(200, b'{"results": [{"index": 0, "relevance_score": ', "json")
            return
        query = body.get("query")
        documents = body.get("documents") if "documents" in body else body.get("texts")
        if not isinstance(query, str) or not isinstance(documents, list):
            message = "query (string) and documents (array) are required"
            self._send_json(422, _error(message, "invalid_request_error"))
            return
        texts = [doc.get("text", "") if isinstance(doc, dict) else str(doc) for doc in documents]
        scores = [word_overlap(query, text) for text in texts]
        order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
        top_n = body.get("top_n")
        if top_n is not None:
            order = order[: int(top_n)]
        shape = self.fake.rerank_shape or ("tei" if "texts" in body else "cohere")
        if shape == "tei":
            self._send_json(200, [{"index": i, "score": scores[i]} for i in order])
            return
        results = [{"index": i, "relevance_score": scores[i]} for i in order]
        if shape == "jina":
            tokens = sum(len(_words(query)) + len(_words(text)) for text in texts)
            usage = {"total_tokens": tokens}
            self._send_json(200, {"model": body.get("model"), "results": results, "usage": usage})
            return
        meta = {"billed_units": {"search_units": 1}}
        self._send_json(200, {"id": "rerank-fake", "results": results, "meta": meta})

    # Wire helpers.

    def _send_fault(self, fault: Fault) -> None:
        status = fault.status or 500
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = str(fault.retry_after_ms)
        kind = "rate_limit_error" if status == 429 else "server_error"
        if 400 <= status < 500 and status != 429:
            kind = "invalid_request_error"
        message = fault.message or f"fake server scripted a {status}"
        self._send_json(status, _error(message, kind), headers=headers)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "json", headers)

    def _send_raw(
        self, status: int, data: bytes, kind: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        content_type = "application/json" if kind == "json" else "text/plain"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _write_event(self, data: str) -> None:
        self._write_chunk(f"data: {data}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        # One HTTP chunk per SSE event, flushed at once, so timing is what the client sees.
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _hang_up(self) -> None:
        """Drop the connection mid-response, as a crashed upstream or a proxy timeout does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _pause(self, seconds: float, *, watch_client: bool) -> None:
        """Sleep; with watch_client, raise as soon as the client closes its end."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.fake._stopping.is_set():
                raise _StopServing
            step = min(remaining, 0.02)
            if not watch_client:
                time.sleep(step)
                continue
            # A closed peer makes the socket readable with EOF; noticing it here, rather
            # than at the next write, keeps chunks_written exact.
            readable, _, _ = select.select([self.connection], [], [], step)
            if readable:
                try:
                    peeked = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    peeked = b""
                if not peeked:
                    raise ConnectionResetError("client closed the connection")
                time.sleep(step)  # bytes, not EOF: nothing to watch for; just wait


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


_ROUTES: dict[tuple[str, str], Callable[[_Handler, Any, Fault], None]] = {
    ("POST", "/v1/embeddings"): _Handler._embeddings,
    ("POST", "/v1/chat/completions"): _Handler._chat_completions,
    ("GET", "/v1/models"): _Handler._models,
    ("POST", "/rerank"): _Handler._rerank,
    ("POST", "/v1/rerank"): _Handler._rerank,
}
