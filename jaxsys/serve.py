"""`jaxsys serve`: an OpenAI-compatible HTTP server over the batching engine.

Endpoints as the OpenAI API names them: `POST /v1/completions` and `/v1/chat/completions`
(`"stream": true` answers with server-sent events, ended by `data: [DONE]`), `GET
/v1/models`; and `GET /health`, `GET /metrics` (Prometheus text). Each choice carries
`token_ids` (the generated ids) next to the text; every response carries `usage`.
Extensions vLLM also accepts: `top_k`, `ignore_eos`, `stop_token_ids`. OpenAI fields it does
not implement (`UNSUPPORTED_FIELDS`: log-probabilities, echo, penalties, tools, ...) are refused
with a 400 unless they hold their off value.

Built on the standard library's threaded HTTP server: one thread per connection, all of
them feeding one `Engine` thread, which batches whatever is in flight. Nothing waits
without bound: a full queue or page pool answers 429/503 with `Retry-After`, every
request has a timeout, and a connection stalled on a read or write is dropped after
`SOCKET_TIMEOUT_S`. A client that disconnects mid-stream has its request cancelled
(its pages return to the pool); SIGTERM stops accepting requests, lets the ones in
flight finish, then exits.
"""

from __future__ import annotations

import json
import logging
import socket
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("jaxsys.serve")
MAX_BODY_BYTES = 1 << 20
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count; thread-safe."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, edge in enumerate(self.buckets):
                if value <= edge:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            out += [f'{name}_bucket{{le="{edge}"}} {c}' for edge, c in zip(self.buckets, self.counts)]
            out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                    f"{name}_count {self.count}"]
        return out


def load_chat_template(model_path: Path | None, template_file: str | None) -> str | None:
    """A Jinja chat template: `--chat-template FILE`, else the model folder's tokenizer_config.json."""
    if template_file is not None:
        try:
            return Path(template_file).read_text()
        except OSError as e:
            raise ValueError(f"--chat-template {template_file}: cannot read it ({e.strerror or e})") from None
    config = model_path / "tokenizer_config.json" if model_path is not None else None
    if config is not None and config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


# OpenAI request fields this server does not implement, each with its "off" values (compared
# with their type, so True is not 1): any other value is refused with a 400, not ignored.
UNSUPPORTED_FIELDS = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "tools": (None, []),
    "functions": (None, []), "response_format": (None, {"type": "text"}),
}


class Service:
    """What the handlers share: the engine, the tokenizer, the model's name, metrics."""

    def __init__(self, engine, tokenizer, model_name: str, *, api_key: str | None = None,
                 chat_template: str | None = None, request_timeout_s: float = 300.0):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.request_timeout_s = api_key, request_timeout_s
        self.chat_template = None
        if chat_template is not None:
            import jinja2.sandbox
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self.chat_template = env.from_string(chat_template)
        self.latency, self.ttft = Histogram(), Histogram()
        self.http_errors: dict[int, int] = {}
        self.active = 0  # POST handlers still answering (SIGTERM waits for them)
        self._lock = threading.Lock()
        self.created = int(time.time())

    def count_error(self, status: int) -> None:
        with self._lock:
            self.http_errors[status] = self.http_errors.get(status, 0) + 1

    # ----- request parsing -----
    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequest("this model has no tokenizer, so text prompts cannot be encoded; send the prompt "
                                 "as a list of token ids")
            return self.tokenizer.encode(prompt, add_bos=True)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return self.prompt_ids(prompt[0])  # a batch of one
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)")

    def chat_ids(self, messages) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer, so chat messages cannot be encoded; use /v1/completions "
                             "with token ids")
        if self.chat_template is None:
            raise BadRequest("this model has no chat template; start the server with --chat-template FILE "
                             "(a Jinja template) or use /v1/completions")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only (this server's models read text)
                for j, part in enumerate(content):
                    is_text = isinstance(part, dict) and part.get("type") == "text"
                    if not (is_text and isinstance(part.get("text"), str)):
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise BadRequest(f"messages[{i}].content[{j}] must be a text part "
                                         f"{{'type': 'text', 'text': ...}}; got {str(kind)[:40]!r}, which this "
                                         f"server does not take")
                content = "".join(part["text"] for part in content)
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
            clean.append({"role": m["role"], "content": content})
        try:
            text = self.chat_template.render(messages=clean, add_generation_prompt=True, bos_token="",
                                             eos_token="")
        except Exception as e:  # noqa: BLE001 - a template error is the request's or the template's fault
            raise BadRequest(f"the chat template failed on these messages: {e}") from None
        return self.tokenizer.encode(text, add_bos=True)

    def request(self, body: dict, prompt: list[int]):
        from jaxsys.engine import Request

        def number(name, default, kind=(int, float), low=None, high=None):
            value = body.get(name, default)
            if value is None:
                value = default
            if not isinstance(value, kind) or isinstance(value, bool):
                raise BadRequest(f"'{name}' must be a number, got {type(value).__name__}")
            if (low is not None and value < low) or (high is not None and value > high):
                raise BadRequest(f"'{name}'={value} is out of range [{low}, {high}]")
            return value

        for name, off in UNSUPPORTED_FIELDS.items():
            if name in body and not any(type(body[name]) is type(o) and body[name] == o for o in off):
                raise BadRequest(f"'{name}' is not supported by this server; leave it out "
                                 f"(got {repr(body[name])[:80]})")
        max_tokens = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise BadRequest(f"'max_tokens' must be an integer, got {type(max_tokens).__name__}")
        if max_tokens < 1:
            raise BadRequest(f"'max_tokens'={max_tokens} must be >= 1")
        if body.get("n", 1) != 1:
            raise BadRequest("'n' must be 1: one choice per request")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a non-empty string or a list of them")
        if stop and self.tokenizer is None:
            raise BadRequest("'stop' strings need a tokenizer; this model takes 'stop_token_ids'")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
            raise BadRequest("'stop_token_ids' must be a list of integers")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise BadRequest("'ignore_eos' must be a boolean")
        eos = () if ignore_eos else tuple(getattr(self.tokenizer, "eos_ids", ()) or
                                          self.engine.model.config.eos_ids)
        seed = body.get("seed")
        seed = int(uuid.uuid4().int % (1 << 31)) if seed is None else number("seed", 0, int)
        req = Request(prompt, max_tokens=max_tokens, temperature=float(number("temperature", 1.0, low=0, high=100)),
                      top_k=number("top_k", 0, int, low=0) if body.get("top_k") != -1 else 0,
                      top_p=float(number("top_p", 1.0, low=0, high=1)), seed=seed,
                      stop_ids=tuple(sorted({*eos, *stop_ids})), timeout_s=self.request_timeout_s)
        if req.top_p <= 0:
            raise BadRequest("'top_p' must be in (0, 1]")
        try:
            self.engine.check(req)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return req, stop

    def text(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)


class TextTracker:
    """Text deltas of a growing token list, holding back incomplete characters; applies stop strings.

    Decodes incrementally, so a stream of n tokens costs O(n) decoding, not O(n^2): the text
    of ids[:read] is kept, and each call decodes only ids[prefix:], the ids since the last
    point where the text ended on a whole character plus those of the step before as context
    (a tokenizer may render a piece differently at the start of a list, e.g. SentencePiece's
    leading space), taking what follows the context's own text.
    """

    def __init__(self, service: Service, stop: list[str]):
        self.service, self.stop, self.sent, self.stopped = service, stop, "", False
        self.stable, self.prefix, self.read, self.head = "", 0, 0, ""  # head: text of ids[prefix:read]

    def text(self, ids: list[int]) -> str | None:
        """The text of `ids` (which extend the ids of earlier calls)."""
        piece = self.service.text(ids[self.prefix:])
        if piece is None:
            return None
        if not piece.startswith(self.head):  # the new ids changed how the context reads: decode them all
            return self.service.text(ids)
        new = piece[len(self.head):]
        if not new.endswith("\ufffd"):  # whole characters (or none): the next calls start from here
            self.stable += new
            self.prefix, self.read = self.read, len(ids)
            self.head = self.service.text(ids[self.prefix:self.read])
            return self.stable
        return self.stable + new

    def delta(self, ids: list[int], final: bool = False) -> str | None:
        full = self.text(ids)
        if full is None:
            return None
        for s in self.stop:
            cut = full.find(s)
            if cut >= 0:
                full, self.stopped, final = full[:cut], True, True
        if not final:
            full = full.rstrip("\ufffd")  # half a UTF-8 character so far
            held = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may be starting
            full = full[:len(full) - held]
        if not full.startswith(self.sent) or len(full) <= len(self.sent):
            return ""
        out, self.sent = full[len(self.sent):], full
        return out


class Handler(BaseHTTPRequestHandler):
    server_version = "jaxsys"
    protocol_version = "HTTP/1.1"
    service: Service  # set on the subclass by `make_server`

    def log_message(self, fmt, *args):  # access log at debug level, on stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    # ----- plumbing -----
    def _send(self, status: int, payload, content_type="application/json", headers=()) -> None:
        data = payload if isinstance(payload, bytes) else (
            payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str = "invalid_request_error", headers=()) -> None:
        self.service.count_error(status)
        # The body may be unread: never reuse this connection, and say so, or an HTTP/1.1
        # client would send its next request down a socket the server is closing.
        self.close_connection = True
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error")
        self._send(status, {"error": {"message": message, "type": kind, "code": code}},
                   headers=[*headers, ("Connection", "close")])

    def _authorized(self) -> bool:
        key = self.service.api_key
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                    headers=[("WWW-Authenticate", "Bearer")])
        return False

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a JSON body with a Content-Length header is required", 411)
        try:
            n = int(length)
        except ValueError:
            raise BadRequest("Content-Length must be an integer") from None
        if n < 0 or n > MAX_BODY_BYTES:
            raise BadRequest(f"the body must be at most {MAX_BODY_BYTES} bytes", 413)
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within {self.timeout:g} s (Content-Length: {n} bytes)",
                             408) from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    # ----- routes -----
    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        if path == "/health":
            draining = self.service.engine.draining
            self._send(503 if draining else 200, {"status": "draining" if draining else "ok"})
        elif path == "/metrics":
            self._send(200, metrics_text(self.service), "text/plain; version=0.0.4")
        elif path == "/v1/models":
            if self._authorized():
                self._send(200, {"object": "list", "data": [{"id": self.service.model_name, "object": "model",
                                                             "created": self.service.created, "owned_by": "jaxsys"}]})
        else:
            self._error(404, f"no route GET {path}", "not_found")

    def do_POST(self):  # noqa: N802
        with self.service._lock:
            self.service.active += 1
        try:
            self._post()
        finally:
            with self.service._lock:
                self.service.active -= 1

    def _post(self) -> None:
        from jaxsys.engine import EngineBusy

        path = self.path.split("?")[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404, f"no route POST {path}", "not_found")
            return
        if not self._authorized():
            return
        try:
            body = self._body()
            model = body.get("model")
            if not isinstance(model, str):
                raise BadRequest("'model' (a string) is required; GET /v1/models lists it")
            if model != self.service.model_name:
                raise BadRequest(f"model {model!r} does not exist; this server serves {self.service.model_name!r}",
                                 404, "model_not_found")
            chat = path == "/v1/chat/completions"
            if chat:
                prompt = self.service.chat_ids(body.get("messages"))
            else:
                if "prompt" not in body:
                    raise BadRequest("'prompt' is required: a string or a list of token ids")
                prompt = self.service.prompt_ids(body["prompt"])
            request, stop = self.service.request(body, prompt)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("'stream' must be a boolean")
            seq = self.service.engine.submit(request)
        except BadRequest as e:
            self._error(e.status, str(e), e.code)
            return
        except ValueError as e:
            self._error(400, str(e))
            return
        except EngineBusy as e:
            self._error(e.status, str(e), "overloaded", headers=[("Retry-After", str(max(1, round(e.retry_after_s))))])
            return
        except Exception as e:  # noqa: BLE001 - a check that failed unexpectedly: answer, never drop the connection
            log.exception("request rejected by an unexpected error")
            self._error(500, f"the request could not be read: {type(e).__name__}: {e}", "server_error")
            return
        (self._stream if stream else self._complete)(seq, chat, stop)

    def _result_fields(self, seq, chat: bool, text: str | None, reason: str | None) -> dict:
        choice = {"index": 0, "token_ids": list(seq.generated), "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return choice

    def _finish_reason(self, seq, tracker: TextTracker) -> str:
        if tracker.stopped:
            return "stop"
        return seq.finish_reason

    def _usage(self, seq) -> dict:
        n = len(seq.generated)
        return {"prompt_tokens": len(seq.request.prompt), "completion_tokens": n,
                "total_tokens": len(seq.request.prompt) + n}

    def _record(self, seq) -> None:
        if seq.latency_s is not None:
            self.service.latency.observe(seq.latency_s)
        if seq.ttft_s is not None:
            self.service.ttft.observe(seq.ttft_s)

    def _complete(self, seq, chat: bool, stop: list[str]) -> None:
        tracker = TextTracker(self.service, stop)
        for _ in seq.stream():
            if stop:
                tracker.delta(seq.generated)
                if tracker.stopped:
                    self.service.engine.cancel(seq)
        seq.wait(5.0)
        self._record(seq)
        if seq.finish_reason == "error":
            self._error(500, seq.error or "generation failed", "engine_error")
            return
        text = tracker.delta(seq.generated, final=True)
        text = None if text is None else tracker.sent
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self._send(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": self.service.model_name,
                         "choices": [self._result_fields(seq, chat, text, self._finish_reason(seq, tracker))],
                         "usage": self._usage(seq)})

    def _stream(self, seq, chat: bool, stop: list[str]) -> None:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        tracker = TextTracker(self.service, stop)

        def chunk(ids, text, reason, usage=None, first=False):
            choice = {"index": 0, "token_ids": ids, "finish_reason": reason}
            if chat:
                choice["delta"] = ({"role": "assistant"} if first else {}) | ({} if text is None else {"content": text})
            else:
                choice["text"] = text
            event = {"id": rid, "object": kind, "created": int(time.time()), "model": self.service.model_name,
                     "choices": [choice]}
            if usage is not None:
                event["usage"] = usage
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            first = True
            for token in seq.stream():
                if tracker.stopped:
                    continue
                text = tracker.delta(seq.generated)
                if tracker.stopped:
                    self.service.engine.cancel(seq)
                chunk([token], text, None, first=first)
                first = False
            seq.wait(5.0)
            self._record(seq)
            if seq.finish_reason == "error":
                self.wfile.write(f"data: {json.dumps({'error': {'message': seq.error}})}\n\n".encode())
            else:
                tail = tracker.delta(seq.generated, final=True)
                chunk([], tail, self._finish_reason(seq, tracker), self._usage(seq), first=first)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        # TimeoutError: a write blocked for the socket timeout, the client having stopped reading.
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            log.info("client went away mid-stream; cancelling request %d", seq.id)
            self.service.engine.cancel(seq)


def metrics_text(service: Service) -> str:
    snap = service.engine.snapshot()
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("jaxsys_requests_total", "counter", "Requests accepted by the engine.", [("", snap.get("requests", 0))])
    metric("jaxsys_requests_finished_total", "counter", "Requests ended, by finish reason.",
           [(f'{{reason="{r}"}}', snap.get(f"finished_{r}", 0))
            for r in ("stop", "length", "timeout", "cancelled", "error")])
    metric("jaxsys_requests_rejected_total", "counter", "Requests refused for now (queue or KV pool full).",
           [('{reason="queue_full"}', snap.get("rejected_queue_full", 0)),
            ('{reason="kv_full"}', snap.get("rejected_kv_full", 0))])
    with service._lock:
        errors = sorted(service.http_errors.items())
    metric("jaxsys_http_errors_total", "counter", "Error responses, by HTTP status.",
           [(f'{{status="{s}"}}', n) for s, n in errors])
    metric("jaxsys_prompt_tokens_total", "counter", "Prompt tokens accepted.", [("", snap.get("prompt_tokens", 0))])
    metric("jaxsys_generation_tokens_total", "counter", "Tokens generated.",
           [("", snap.get("generated_tokens", 0))])
    metric("jaxsys_preemptions_total", "counter", "Sequences preempted (pages freed, recomputed later).",
           [("", snap.get("preemptions", 0))])
    metric("jaxsys_engine_steps_total", "counter", "Serving steps run.", [("", snap.get("steps", 0))])
    metric("jaxsys_queue_length", "gauge", "Requests waiting for a batch slot.", [("", snap["waiting"])])
    metric("jaxsys_running_sequences", "gauge", "Sequences in the running batch.", [("", snap["running"])])
    metric("jaxsys_kv_pages_in_use", "gauge", "KV cache pages held by sequences.", [("", snap["pages_in_use"])])
    metric("jaxsys_kv_pages_total", "gauge", "KV cache pages in the pool.", [("", snap["pages_total"])])
    if service.engine.config.speculative != "none":
        spec = service.engine.speculative_metrics()
        metric("jaxsys_spec_rounds_total", "counter", "Speculative rounds (one target forward per sequence).",
               [("", spec["rounds"])])
        metric("jaxsys_spec_acceptance", "gauge", "Fraction of drafted tokens accepted, by draft position.",
               [(f'{{position="{j}"}}', round(a, 6)) for j, a in enumerate(spec["acceptance_by_position"])])
        metric("jaxsys_spec_target_forwards_per_token", "gauge", "Target forwards per token of speculative rounds.",
               [("", round(spec["target_forwards_per_token"], 6))])
        if "retrieval_rebuilds" in spec:
            metric("jaxsys_spec_retrieval_rebuilds_total", "counter", "Retrieval selections made (self-speculation).",
                   [("", spec["retrieval_rebuilds"])])
    lines += service.latency.lines("jaxsys_request_latency_seconds", "Submission to last token.")
    lines += service.ttft.lines("jaxsys_time_to_first_token_seconds", "Submission to first token.")
    return "\n".join(lines) + "\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Connections the kernel queues before the accept loop takes them (socketserver's default is 5: 32 clients
    # connecting at once had some reset). Admission is the engine's job: a queue limit answers 429, not a reset.
    request_queue_size = socket.SOMAXCONN


# Seconds a connection may stall on one read or write: a request line, headers or body that
# stop arriving (or a streaming client that stops reading) give up the connection's thread
# after this (408 for a body), where without a timeout they would hold it for as long as
# the client keeps the socket open. Also how long an idle keep-alive connection is kept.
SOCKET_TIMEOUT_S = 30.0


def make_server(service: Service, host: str, port: int, *, socket_timeout_s: float = SOCKET_TIMEOUT_S
                ) -> ThreadingHTTPServer:
    if not socket_timeout_s > 0:
        raise ValueError(f"socket_timeout_s={socket_timeout_s} must be > 0")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} must be in 0..65535 (0: any free port)")
    handler = type("BoundHandler", (Handler,), {"service": service, "timeout": socket_timeout_s})
    try:
        return _Server((host, port), handler)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(service: Service, host: str, port: int, *, ready=print, socket_timeout_s: float = SOCKET_TIMEOUT_S
          ) -> None:
    """Run until SIGTERM or SIGINT: then refuse new requests, finish the ones in flight, and return."""
    server = make_server(service, host, port, socket_timeout_s=socket_timeout_s)
    service.engine.start()
    stopping = threading.Event()

    def drain_then_stop():
        log.info("stopping: finishing %d in-flight request(s)", service.engine.snapshot()["running"])
        service.engine.stop(drain=True)
        deadline = time.time() + 30
        while service.active and time.time() < deadline:  # handlers writing their last chunks
            time.sleep(0.02)
        server.shutdown()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            service.engine.draining = True
            threading.Thread(target=drain_then_stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready(f"serving {service.model_name} on http://{host}:{server.server_address[1]}")
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        service.engine.stop(drain=False, timeout_s=5.0)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument("--model", required=True, help="a preset, a jaxsys checkpoint folder, or a Hugging Face folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed on stdout)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None, help="model id in the API (default: the folder's name)")
    s.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template (default: the model folder's tokenizer_config.json, if it has one)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-len", type=int, default=None, help="prompt + generated tokens per request "
                                                             "(default: the model's max_seq_len)")
    s.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    s.add_argument("--num-pages", type=int, default=None, help="KV pages in the pool (default: max-batch full-"
                                                               "length sequences)")
    s.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per prefill lane per step")
    s.add_argument("--prefill-lanes", type=int, default=1, help="prompts prefilled side by side in one step")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request ends")
    s.add_argument("--socket-timeout", type=float, default=SOCKET_TIMEOUT_S,
                   help="seconds a connection may stall on one read or write before it is dropped (408 for a body)")
    s.add_argument("--nano-batches", default="1", metavar="N|auto",
                   help="split every decode batch of at least N rows into N even nano-batches, "
                        "or 'auto': search the full batch's split at start-up")
    s.add_argument("--speculative", default="none", choices=("none", "draft", "self", "triforce"),
                   help="draft: a draft model proposes --gamma tokens per round, the model verifies them; self: the "
                        "model over a retrieval selection of its KV pages proposes them; triforce: the draft model "
                        "proposes to the retrieval level, which proposes --gamma-outer tokens (all lossless)")
    s.add_argument("--draft", default=None, help="the draft model (same vocabulary) for --speculative draft/triforce")
    s.add_argument("--gamma", type=int, default=4, help="tokens drafted per speculative round")
    s.add_argument("--gamma-outer", type=int, default=8, help="triforce: tokens the retrieval level proposes to "
                                                              "each full verify")
    s.add_argument("--draft-window", type=int, default=256, help="triforce: the draft model's recent window "
                                                                 "(tokens, beside its first page)")
    s.add_argument("--retrieval-budget", type=int, default=256,
                   help="self: tokens (whole pages) of each sequence's KV the drafting reads per layer and KV head, "
                        "beside the pages committed since the selection")
    s.add_argument("--rebuild-every", type=int, default=8, help="self: rounds between retrieval selections")
    s.add_argument("--warmup", action="store_true",
                   help="compile every step program before accepting requests (no compile lands in a request)")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    s.add_argument("--seed", type=int, default=0, help="parameters of a bare preset")


def build_engine(args):
    """(engine, tokenizer, model path) from `serve`-style arguments."""
    import dataclasses

    import jax

    from jaxsys.config import default_compute_dtype
    from jaxsys.engine import Engine, EngineConfig
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef

    loaded = load_model(args.model)
    dtype = default_compute_dtype(jax.default_backend()) if args.dtype == "auto" else args.dtype
    config = dataclasses.replace(loaded.config, dtype=dtype)
    model = ModelDef(config)
    params = loaded.params if loaded.params is not None else model.init(args.seed)
    engine_config = EngineConfig(max_batch=args.max_batch, max_len=args.max_len, page_size=args.page_size,
                                 num_pages=args.num_pages, prefill_chunk=args.prefill_chunk,
                                 prefill_lanes=args.prefill_lanes, max_queue=args.max_queue,
                                 speculative=args.speculative, gamma=args.gamma,
                                 retrieval_budget=args.retrieval_budget, rebuild_every=args.rebuild_every,
                                 gamma_outer=args.gamma_outer, draft_window=args.draft_window)
    draft = draft_params = None
    if (args.speculative in ("draft", "triforce")) != (args.draft is not None):
        raise ValueError("--draft PATH goes with --speculative draft or triforce (and only with them)")
    if args.draft is not None:
        loaded_draft = load_model(args.draft)
        draft = ModelDef(dataclasses.replace(loaded_draft.config, dtype=dtype))
        draft_params = loaded_draft.params if loaded_draft.params is not None else draft.init(args.seed + 1)
    if args.nano_batches not in ("auto",) and not args.nano_batches.isdigit():
        raise ValueError(f"--nano-batches {args.nano_batches!r}: give a count (1 = off) or 'auto'")
    if args.nano_batches.isdigit() and int(args.nano_batches) > 1:
        from jaxsys.engine import buckets_for
        from jaxsys.nanobatch import even_split
        n = int(args.nano_batches)
        engine_config = dataclasses.replace(engine_config, splits=tuple(
            even_split(rows, n) for rows in buckets_for(args.max_batch) if rows >= n))
    if args.speculative != "none" and args.nano_batches != "1":
        raise ValueError(f"--nano-batches applies to plain decoding; drop it with --speculative {args.speculative}")
    engine = Engine(model, params, engine_config, draft=draft, draft_params=draft_params)
    if args.nano_batches == "auto":
        search = engine.search_splits()
        log.info("nano-batch search: %s (measured %s)", search.best,
                 {k: f"{v * 1e3:.2f} ms" for k, v in search.measured.items()})
    if args.warmup:
        t0 = time.perf_counter()
        log.info("warm-up: compiled %d step programs in %.1f s", engine.warmup(), time.perf_counter() - t0)
    return engine, loaded.tokenizer, loaded.path


def run(args) -> int:
    engine, tokenizer, path = build_engine(args)
    name = args.served_model_name or (path.name if path is not None else args.model.rstrip("/").split("/")[-1])
    service = Service(engine, tokenizer, name, api_key=args.api_key,
                      chat_template=load_chat_template(path, args.chat_template),
                      request_timeout_s=args.request_timeout)
    serve(service, args.host, args.port, ready=lambda line: print(line, flush=True),
          socket_timeout_s=args.socket_timeout)
    return 0
