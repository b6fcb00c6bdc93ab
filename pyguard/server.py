"""``pyguard serve``: an OpenAI-compatible HTTP server over a batched :class:`GuardedLlama`.

Endpoints: ``POST /v1/chat/completions`` (JSON, or SSE with ``"stream": true``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus). Every response carries the ``pyguard`` report.
Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with 400 (bad
request), 401 (API key), 404, 429 (queue full, with Retry-After) or 500; the server keeps serving.
A client that disconnects cancels its request, which frees its sequences at the next step.

Needs ``pip install 'pyguard[server]'`` (FastAPI, uvicorn, sse-starlette, prometheus-client).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import time
from typing import Any, Literal, Optional, Union

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"pyguard serve needs the server extra: pip install 'pyguard[server]' ({e})") from e

from . import responses
from .llama.scheduler import Cancelled, QueueFull


# ----------------------------------------------------------------------------- the request body
class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request pyguard serves; others are refused by name."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]]
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: Literal[1] = 1
    user: Optional[str] = None
    pyguard: Optional[dict[str, Any]] = None  # this request's methods, e.g. {"coca": false} (Policy.guards)
    ignore_eos: bool = False  # as vLLM and llama-server: run to max_tokens (load generators send it)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


class _Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pyguard_requests", "Chat completion requests, by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("pyguard_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("pyguard_prompt_cached_tokens", "Prompt tokens the prompt cache supplied",
                                     registry=r)
        self.completion_tokens = Counter("pyguard_completion_tokens", "Tokens generated", registry=r)
        self.queue = Gauge("pyguard_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("pyguard_active_requests", "Requests being decoded", registry=r)
        self.sequences = Gauge("pyguard_active_sequences", "KV sequences in use (CoCA runs two per request)",
                               registry=r)
        self.branches = Counter("pyguard_cascade_branch", "Cascade routes", ["branch"], registry=r)
        self.casa_flags = Counter("pyguard_casa_unsafe", "Prompts CASA judged unsafe", registry=r)
        self.ttft = Histogram("pyguard_time_to_first_token_seconds", "From arrival to the first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("pyguard_inter_token_latency_seconds", "Between consecutive tokens", registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))


def create_app(g, model_name: str | None = None, api_key: str | None = None, retry_after: int = 1) -> FastAPI:
    """The FastAPI app serving the guarded model ``g`` (a GuardedLlama; the app closes it at shutdown)."""
    name = model_name or g.name
    m = _Metrics()
    app = FastAPI(title="pyguard", on_shutdown=[g.close])
    app.state.guard, app.state.metrics = g, m

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
        if err.get("type") == "extra_forbidden":
            return _error(400, f"unknown or unsupported field {where!r}", param=where)
        return _error(400, f"{where}: {err['msg']}" if where else err["msg"], param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(_, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    @app.exception_handler(Exception)
    async def _crash(_, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        waiting, active = g.scheduler.depth()
        return {"status": "ok", "waiting": waiting, "active": active}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pyguard"}]}

    @app.get("/metrics")
    async def metrics():
        waiting, active = g.scheduler.depth()
        m.queue.set(waiting)
        m.active.set(active)
        m.sequences.set(g.scheduler.n_sequences())
        return PlainTextResponse(generate_latest(m.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        t0 = time.perf_counter()
        max_tokens = body.max_completion_tokens or body.max_tokens
        try:
            job = await run_in_threadpool(g.submit, body.messages, max_tokens, body.temperature, body.top_p,
                                          body.seed, body.stop, lambda: loop.call_soon_threadsafe(wake.set),
                                          guards=body.pyguard, ignore_eos=body.ignore_eos)
        except QueueFull as e:
            m.requests.labels("429").inc()
            return _error(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                          headers={"Retry-After": str(retry_after)})
        except (ValueError, TypeError) as e:
            m.requests.labels("400").inc()
            return _error(400, str(e))
        except RuntimeError as e:  # closed: shutting down
            m.requests.labels("503").inc()
            return _error(503, str(e), "server_error")
        events = _events(job, wake, m, t0)
        if body.stream:
            return EventSourceResponse(_sse(job, events, name, body, m), ping=15)
        text, finish, n, report = "", "length", 0, None
        try:
            async for piece, finish_now, n, report in events:
                text += piece
                finish = finish_now or finish
                if await request.is_disconnected():
                    raise Cancelled("the client disconnected")
        except Cancelled:
            job.cancel()
            m.requests.labels("499").inc()
            return _error(499, "cancelled", "cancelled")
        except Exception as e:  # noqa: BLE001
            m.requests.labels("500").inc()
            return _error(500, f"generation failed: {e}", "server_error")
        _account(m, job, n, report)
        return responses.completion(job.id, name, text, finish, job.n_prompt, n, report, job.n_cached)

    return app


def serve(app, host: str, port: int, log_level: str = "warning", grace: float = 30) -> None:
    """Run ``app`` under uvicorn until Ctrl-C / SIGTERM: stop accepting, let requests in flight
    finish (``grace`` seconds), return (the process then exits 0; uvicorn alone re-raises the
    signal, which a supervisor reads as a crash)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)).run()


async def _events(job, wake: asyncio.Event, m: _Metrics, t0: float):
    """The job's events, awaited without blocking the loop; cancels the job when abandoned."""
    last = None
    try:
        while True:
            try:
                ev = job.events.get_nowait()
            except queue.Empty:
                wake.clear()
                if job.events.empty():
                    await wake.wait()
                continue
            if isinstance(ev, BaseException):
                raise ev
            now = time.perf_counter()
            if ev[2] > 0:  # a token
                (m.ttft if last is None else m.itl).observe(now - (t0 if last is None else last))
                last = now
            yield ev
            if ev[1] is not None:
                return
    finally:
        job.cancel()  # a no-op once it finished


def _account(m: _Metrics, job, n: int, report: dict | None) -> None:
    m.requests.labels("200").inc()
    m.prompt_tokens.inc(job.n_prompt)
    m.cached_tokens.inc(job.n_cached)
    m.completion_tokens.inc(n)
    if report:
        if report.get("cascade"):
            m.branches.labels(report["cascade"]["branch"]).inc()
        if report.get("casa") and report["casa"]["unsafe"]:
            m.casa_flags.inc()


async def _sse(job, events, name: str, body: ChatRequest, m: _Metrics):
    """OpenAI's stream: chunks, the last with the finish reason and the report, then [DONE]."""
    usage = bool((body.stream_options or {}).get("include_usage"))
    yield json.dumps(responses.chunk(job.id, name, {"role": "assistant", "content": ""}))
    try:
        async for piece, finish, n, report in events:
            if piece:
                yield json.dumps(responses.chunk(job.id, name, {"content": piece}))
            if finish:
                yield json.dumps(responses.chunk(job.id, name, {}, finish, report))
                if usage:
                    yield json.dumps({"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": name, "choices": [],
                                      "usage": responses.usage(job.n_prompt, n, job.n_cached)})
                _account(m, job, n, report)
    except Cancelled:
        return
    except Exception as e:  # noqa: BLE001 - tell the client, end the stream
        yield json.dumps({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                    "code": 500}})
    yield "[DONE]"

