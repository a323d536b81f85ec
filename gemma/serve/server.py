"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI + uvicorn; the one module importing them).

    POST /v1/completions, POST /v1/chat/completions (stream: server-sent events ending in [DONE])
    GET /v1/models, GET /health, GET /metrics (Prometheus text)
    POST /v1/weights {"path": DIR, "version": N}: load new weights (local callers only)

Extensions to OpenAI's fields: `top_k`, `weights_version` (the version the caller acts on, checked
against --max-staleness). Every response carries "weights_version" (the newest version its tokens
were made with); each choice carries "weights_versions": [first, last].
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from gemma.chat import MODEL, USER, format_dialog
from gemma.serve.engine import TOP_LOGPROBS, Engine, EngineClosed, Event, Generation, Request, StaleWeights

DEFAULT_CHAT_MAX_TOKENS = 512  # chat requests without max_tokens: this, or what room max_len leaves
_POLL_S = 0.1  # how often a waiting handler checks that its client is still connected
_LOCAL = {"127.0.0.1", "::1", "localhost"}


class BadRequest(Exception):
    """A request the API refuses: its HTTP status and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


# ---------------------------------------------------------------------- request fields
def _field(body: dict, name: str, kinds: tuple, default=None, check: Callable[[Any], bool] | None = None,
           expected: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise BadRequest(f"'{name}' must be {expected or ' or '.join(k.__name__ for k in kinds)}, got "
                         f"{json.dumps(value)[:80]}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", name)
    return value


def _sampling(body: dict, engine: Engine) -> dict:
    """The sampling fields shared by completions and chat, checked."""
    n = _field(body, "n", (int,), 1, lambda v: v >= 1, "an integer >= 1")
    if n > engine.max_batch:
        raise BadRequest(f"'n' ({n}) exceeds the server's --max-batch ({engine.max_batch})", "n")
    temperature = _field(body, "temperature", (int, float), 1.0, lambda v: v >= 0, "a number >= 0 (0 is greedy)")
    top_p = _field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", (int,), None, lambda v: v >= 0, "an integer >= 0 (0 or null: off)")
    seed = _field(body, "seed", (int,), None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to 4 of them, got "
                         f"{json.dumps(body.get('stop'))[:80]}", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), 0) != 0:
            raise BadRequest(f"'{name}' is not supported (only 0)", name)
    version = _field(body, "weights_version", (int,), None)
    return dict(n=n, temperature=float(temperature), top_p=None if top_p == 1 else float(top_p),
                top_k=top_k or None, seed=seed, stop=tuple(stop), weights_version=version)


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        if body.get(name) is not None:
            return _field(body, name, (int,), None, lambda v: v >= 1, "an integer >= 1")
    return default


def _prompts(body: dict, engine: Engine) -> list[tuple[int, ...]]:
    """The completions `prompt`: a string, a list of strings, a list of ids or a list of id lists."""
    prompt = body.get("prompt")
    what = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest(f"'prompt' must be {what}, got {json.dumps(prompt)[:80]}", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            raise BadRequest(f"'prompt' must be {what}", "prompt")
        try:
            out.append(tuple(engine.sampler.encode_prompt(p)))
        except ValueError as e:
            raise BadRequest(str(e), "prompt")
    return out


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise BadRequest(f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}} (this server "
                             f"takes no images)", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return content


def chat_prompt(messages, engine: Engine) -> tuple[int, ...]:
    """Token ids of OpenAI-style `messages` in the Gemma 3 chat template (gemma.chat.format_dialog):
    system (or developer) messages join into the system prompt; user and assistant turns alternate."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_content(m, i))
        elif role in ("user", "assistant"):
            turns.append((USER if role == "user" else MODEL, _content(m, i)))
        else:
            raise BadRequest(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}", "messages")
    try:
        text = format_dialog(turns, "\n\n".join(system) or None)
    except ValueError as e:
        raise BadRequest(str(e).replace("'model'", "'assistant'"), "messages")
    return tuple(engine.sampler.encode_prompt(text))


# ---------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               load_weights: Callable[[str], Any] | None = None) -> FastAPI:
    """The API over `engine`. `load_weights(path)` turns a POST /v1/weights path into weights for
    `engine.update_weights` (None: the endpoint answers 404)."""
    app = FastAPI(title="gemma3-jax", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    tok = engine.tokenizer

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            if not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
                return BadRequest("a valid API key is needed: send 'Authorization: Bearer KEY'", None, 401,
                                  "authentication_error").response()
        return await call_next(request)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return exc.response()

    @app.exception_handler(404)
    async def not_found(request, exc):
        return BadRequest(f"no route {request.method} {request.url.path}", None, 404, "not_found_error").response()

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return BadRequest(f"{request.method} is not allowed on {request.url.path}", None, 405,
                          "invalid_request_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "weights_version": engine.weights_version}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "weights_version": engine.weights_version,
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gemma3-jax",
                          "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.weights_version),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/weights")
    async def weights(request: HTTPRequest):
        if request.client is None or request.client.host not in _LOCAL:
            raise BadRequest("weight updates are accepted from local callers only", None, 403, "permission_error")
        if load_weights is None:
            raise BadRequest("this server takes no weight updates over HTTP", None, 404, "not_found_error")
        body = await _body(request)
        path = _field(body, "path", (str,), None, bool, "a checkpoint path")
        version = _field(body, "version", (int,), None)
        if path is None or version is None:
            raise BadRequest("give 'path' (a checkpoint) and 'version' (an integer above the current one)",
                             "path" if path is None else "version")
        if version <= engine.weights_version:
            raise BadRequest(f"'version' must exceed the current {engine.weights_version}, got {version}", "version")
        try:
            params = await asyncio.to_thread(load_weights, path)
            await asyncio.to_thread(engine.update_weights, params, version)
        except (OSError, ValueError) as e:
            raise BadRequest(str(e), "path")
        return {"weights_version": engine.weights_version}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _body(request)
        sampling = _sampling(body, engine)
        prompts = _prompts(body, engine)
        max_tokens = _max_tokens(body, ("max_tokens",), 16)
        logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= TOP_LOGPROBS,
                          f"an integer in [0, {TOP_LOGPROBS}]")
        if _field(body, "echo", (bool,), False):
            raise BadRequest("'echo' is not supported", "echo")
        return await _serve(request, body, "text_completion", prompts, max_tokens, sampling, logprobs)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await _body(request)
        sampling = _sampling(body, engine)
        ids = chat_prompt(body.get("messages"), engine)
        room = engine.max_len - len(ids)
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"),
                                 max(1, min(DEFAULT_CHAT_MAX_TOKENS, room)))
        want = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= TOP_LOGPROBS,
                     f"an integer in [0, {TOP_LOGPROBS}]")
        return await _serve(request, body, "chat.completion", [ids], max_tokens, sampling, top if want else None)

    async def _serve(request, body, kind, prompts, max_tokens, sampling, logprobs):
        stream = _field(body, "stream", (bool,), False)
        options = _field(body, "stream_options", (dict,), {}) or {}
        model = body.get("model") if isinstance(body.get("model"), str) else model_name
        n = sampling["n"]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gens: list[Generation] = []
        try:
            for p, ids in enumerate(prompts):
                listener = (lambda p: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (p, ev)))(p)
                gens.append(engine.submit(Request(ids, max_tokens, logprobs=logprobs, **sampling), listener))
        except StaleWeights as e:
            _cancel(gens)
            raise BadRequest(str(e), "weights_version", 409, "stale_weights_error")
        except EngineClosed as e:
            _cancel(gens)
            raise BadRequest(str(e), None, 503, "server_error")
        except ValueError as e:
            _cancel(gens)
            raise BadRequest(str(e), "max_tokens" if "max_len" in str(e) else "n" if "max_batch" in str(e)
                             else None)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + secrets.token_hex(12)
        head = dict(id=rid, created=int(time.time()), model=model)
        if stream:
            events = _events(request, queue, gens, len(prompts) * n)
            return StreamingResponse(_sse(kind, head, events, gens, logprobs, options.get("include_usage")),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async for _ in _events(request, queue, gens, len(prompts) * n):
            pass
        for g in gens:
            if g.error is not None:
                raise BadRequest(str(g.error), None, 409 if isinstance(g.error, StaleWeights) else 500,
                                 "stale_weights_error" if isinstance(g.error, StaleWeights) else "server_error")
        choices = [_choice(kind, p * n + c.index, c, logprobs) for p, g in enumerate(gens) for c in g.choices]
        return {**head, "object": kind, "choices": choices, "usage": _usage(gens),
                "weights_version": max(c.last_version or 0 for g in gens for c in g.choices)}

    async def _events(request, queue, gens, total):
        """(prompt index, Event) pairs until every choice has ended; a client gone cancels the rest."""
        ended = 0
        try:
            while ended < total:
                try:
                    p, ev = await asyncio.wait_for(queue.get(), _POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                ended += ev.finish_reason is not None
                yield p, ev
        finally:
            if ended < total:
                _cancel(gens)

    def _choice(kind, index, c, logprobs):
        out = {"index": index, "finish_reason": "length" if c.finish_reason == "length" else "stop",
               "weights_versions": [c.first_version, c.last_version]}
        if kind == "chat.completion":
            out["message"] = {"role": "assistant", "content": c.text}
            out["logprobs"] = None if logprobs is None else {"content": [
                _chat_logprob(t, lp, top) for t, lp, top in zip(c.tokens, c.logprobs, c.top_logprobs)]}
        else:
            out["text"] = c.text
            out["logprobs"] = None if logprobs is None else _completion_logprobs(c.tokens, c.logprobs,
                                                                                 c.top_logprobs, 0)
        return out

    def _piece(token: int) -> str:
        return tok.decode([token])

    def _chat_logprob(token, lp, top):
        piece = _piece(token)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                "top_logprobs": [{"token": _piece(i), "logprob": v, "bytes": list(_piece(i).encode())}
                                 for i, v in top]}

    def _completion_logprobs(tokens, lps, tops, offset):
        pieces = [_piece(t) for t in tokens]
        offsets, at = [], offset
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": [{_piece(i): v for i, v in top}
                                                                          for top in tops],
                "text_offset": offsets}

    async def _sse(kind, head, events, gens, logprobs, include_usage):
        n = gens[0].request.n
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        offsets: dict[int, int] = {}

        def chunk(choices, version, **extra):
            return "data: " + json.dumps({**head, "object": chunk_kind, "choices": choices,
                                          "weights_version": version, **extra}) + "\n\n"

        if kind == "chat.completion":
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(gens) * n)], engine.weights_version)
        async for p, ev in events:
            index = p * n + ev.index
            if ev.finish_reason is None and not ev.text and logprobs is None:
                continue  # a partial UTF-8 character: its text comes with the next token
            finish = None if ev.finish_reason is None else ("length" if ev.finish_reason == "length" else "stop")
            lp = None
            if logprobs is not None and ev.token >= 0:
                lp = ({"content": [_chat_logprob(ev.token, ev.logprob, ev.top_logprobs)]}
                      if kind == "chat.completion" else
                      _completion_logprobs([ev.token], [ev.logprob], [ev.top_logprobs], offsets.get(index, 0)))
            offsets[index] = offsets.get(index, 0) + len(ev.text)
            if kind == "chat.completion":
                choice = {"index": index, "delta": {"content": ev.text} if ev.text or finish is None else {},
                          "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": index, "text": ev.text, "logprobs": lp, "finish_reason": finish}
            if finish is not None:  # the versions the whole choice was generated under, as in a plain answer
                c = gens[p].choices[ev.index]
                choice["weights_versions"] = [c.first_version, c.last_version]
            yield chunk([choice], ev.weights_version)
        if any(g.error is not None for g in gens):
            error = next(g.error for g in gens if g.error is not None)
            yield "data: " + json.dumps({"error": {"message": str(error), "type": "server_error", "param": None,
                                                   "code": None}}) + "\n\n"
        elif include_usage:
            yield chunk([], engine.weights_version, usage=_usage(gens))
        yield "data: [DONE]\n\n"

    return app


def _usage(gens: list[Generation]) -> dict:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(len(c.tokens) for g in gens for c in g.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _cancel(gens: list[Generation]) -> None:
    for g in gens:
        g.cancel()


async def _body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})")
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Runs `app` under uvicorn until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)).run()
