"""The HTTP front: an ASGI app (FastAPI on Starlette, served by uvicorn; the two
completion routes answered ahead of FastAPI's routing: ``App``) over one AsyncEngine.
Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics, GET / (the chat page); POST /admin/drain?replica=K and POST
/admin/undrain?replica=K (behind the API key) take a data-parallel replica out of
service for maintenance and bring it back; a drain's running requests move with their KV
blocks where that is cheaper than recomputing them (``&kv=auto``, the default; ``migrate``
or ``replay`` force one way; a ``-direct`` or ``-relay`` suffix, e.g. ``migrate-relay``,
picks the blocks' route: rank to rank, or through the front: engine.migration).

Every bad request is answered in the OpenAI error format with a 4xx (400 a bad field,
401 a wrong or missing key, 404 an unknown model or route, 413 a body too large, 429 a
full queue) and the server keeps serving; 503 when the engine has stopped.

The app runs in the HTTP process (serve.http_server); the engine, its metrics and the
workers' status are in the engine's process, reached through serve.engine_client."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llamadist.serve import responses
from llamadist.serve.metrics import HttpMetrics
from llamadist.serve.openai_api import Frontend, Job, sse
from llamadist.serve.protocol import (MAX_BODY_BYTES, ApiError, ChatRequest,
                                      CompletionRequest, parse, too_large)

log = logging.getLogger(__name__)


async def client_left(receive) -> None:
    """Returns when the client has gone (``http.disconnect``); the request's body must
    have been read (uvicorn then answers ``receive`` only when the connection ends, or
    once the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# A body over MAX_BODY_BYTES is read to its end (and dropped, never held) up to this size,
# so that a client still sending it reads the 413 instead of a reset connection; one
# declared or sent past it is answered at once, the rest unread.
DISCARD_BYTES = 64 << 20


async def read_body(request: Request) -> bytes:
    """The request's body, or ApiError 413 past MAX_BODY_BYTES: this process never holds
    more than the limit of it (a declared Content-Length past DISCARD_BYTES is refused
    before any byte is read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DISCARD_BYTES:
        raise too_large(declared)
    body, size = bytearray(), 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > DISCARD_BYTES:
                raise too_large(f"over {size}")
            if size <= MAX_BODY_BYTES:
                body += part
    except ClientDisconnect:  # answered to no one, but not logged as the app's failure
        raise ApiError(499, "the client disconnected while sending its body") from None
    if size > MAX_BODY_BYTES:
        raise too_large(size)
    return bytes(body)


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 256   # engine requests queued or running at most; more get 429


class Server:
    """The app's state: the front end, the metrics, the requests in flight."""

    def __init__(self, frontend: Frontend, metrics: HttpMetrics, config: ServeConfig):
        self.frontend, self.metrics, self.config = frontend, metrics, config
        self.in_flight = 0

    async def admit(self, job: Job) -> None:
        """Queue the job's choices, or 429 when the queue would be over its limit."""
        n = len(job.choices)
        if n > self.config.max_queue:  # never, not "retry later" (429)
            raise ApiError(400, f"n: {n} choices (prompts x n), more than the queue ever "
                                f"holds (--max-queue {self.config.max_queue}); send fewer",
                           "n")
        if self.in_flight + n > self.config.max_queue:
            raise ApiError(429, f"the queue is full ({self.in_flight} requests queued or "
                                f"running, --max-queue {self.config.max_queue}); retry later",
                           kind="rate_limit_error")
        self.in_flight += n  # before the wait: a burst of jobs must not all pass the check
        try:
            await self.frontend.submit(job)
        except BaseException:
            self.in_flight -= n
            job.released = True
            raise

    def release(self, job: Job) -> None:
        """The job is over (answered, streamed, or its client gone): once per job."""
        if job.released:
            return
        job.released = True
        self.frontend.cancel(job)  # whatever has not finished
        self.in_flight -= len(job.choices)  # (the engine's process observes their timings)

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a wrong or missing API key: send 'Authorization: Bearer KEY'",
                           kind="authentication_error")

    async def admin(self, request: Request, what: str) -> dict:
        """Drain or undrain replica ``?replica=K`` (400 a bad K, 404 no such replica,
        409 the only one serving); answers once the engine thread has done it. A
        browser's request from another site's page (its Origin not this server) is
        refused (403): without a key, any page a user opens could drain a replica."""
        self.check_key(request)
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise ApiError(403, f"admin requests come from this server's own origin, not "
                                f"{origin!r} (a page of another site)",
                           kind="permission_error")
        given = request.query_params.get("replica")
        # plain ASCII digits only: int() would take "1_0" (10) and " 1 "
        if given is None or not (given.isascii() and given.isdecimal()):
            got = "none was given" if given is None else f"not {given!r}"
            raise ApiError(400, f"give the replica to {what} as ?replica=K (an integer), "
                                f"{got}", param="replica")
        key = int(given)
        kw = {}
        if what == "drain":  # the running requests' KV: auto | migrate | replay [-direct|-relay]
            kw["kv"] = request.query_params.get("kv", "auto")  # checked by the engine's side
        try:
            states = await self.frontend.engine.rpc("admin", what, key, kw, timeout=None)
        except ValueError as e:  # e.g. kv not one of the policies
            raise ApiError(400, str(e), param="kv" if str(e).startswith("kv") else None) \
                from None
        except LookupError as e:
            raise ApiError(404, str(e), param="replica", kind="not_found_error") from None
        except RuntimeError as e:
            raise ApiError(409, str(e), param="replica") from None
        return {"replica": key, "replicas": states}

    # ---- one completion request -------------------------------------------------------
    async def complete(self, request: Request, kind: str) -> Response:
        self.check_key(request)
        body = await read_body(request)
        if kind == "chat":
            job = self.frontend.chat_job(parse(ChatRequest, body))
        else:
            job = self.frontend.completion_job(parse(CompletionRequest, body))
        await self.admit(job)
        if job.body.stream:
            return JobStream(self._stream(job), job, self)
        try:
            return JSONResponse(await self._whole(job, request))
        finally:
            self.release(job)

    async def _whole(self, job: Job, request: Request) -> dict:
        async def drain() -> None:
            async for _ in self.frontend.outputs(job):
                pass
        task = asyncio.ensure_future(drain())
        left = asyncio.ensure_future(client_left(request.receive))
        try:
            await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client left: the choices are cancelled (release)
                raise ApiError(499, "the client disconnected")
            task.result()
        finally:
            task.cancel()
            left.cancel()
        return responses.whole_response(job, self.frontend.tokenizer, self.config.model_name)

    async def _stream(self, job: Job):
        tok, model = self.frontend.tokenizer, self.config.model_name
        try:
            if job.kind == "chat":
                for c in job.choices:
                    yield sse(responses.chunk(job, model, {
                        "index": c.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}))
            # one write per wake-up for every event already here (a server behind its
            # engine catches up in fewer socket writes, each costing more than its
            # event); the text events from templates (responses.TextEvents)
            text_events = responses.TextEvents(job, model)
            last = ""  # one choice's last events: written with the usage and [DONE]
            async for c, outs in self.frontend.steps(job):
                events = []
                for out in outs:
                    if out.text or out.finished or job.num_logprobs is not None:
                        reason = out.finish_reason if out.finished else None
                        e = text_events.event(c, out.text, out.logprobs, reason)
                        events.append(e if e is not None else sse(responses.chunk(
                            job, model, responses.delta_choice(job, tok, c, out.text,
                                                               out.logprobs, reason))))
                if events and outs[-1].finished and len(job.choices) == 1:
                    last = "".join(events)
                elif events:
                    yield "".join(events).encode()
            opts = job.body.stream_options
            if opts is not None and opts.include_usage:
                last += sse(responses.usage_chunk(job, model))
            yield (last + sse("[DONE]")).encode()
        except ApiError as e:  # the engine failed mid-stream: an error event, then the end
            yield sse(e.body())
        finally:
            self.release(job)


class JobStream(StreamingResponse):
    """The job's server-sent events; the job is released however the response ends,
    even when the client left before its first chunk (the body never started, so its
    own ``finally`` never runs)."""

    def __init__(self, body, job: Job, server: Server):
        super().__init__(body, media_type="text/event-stream")
        self.job, self.server = job, server

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._respond(receive, send)
        finally:
            self.server.release(self.job)

    async def _respond(self, receive, send) -> None:
        """Starlette's ``stream_response`` in this task, and a task that waits for the
        client to leave (``http.disconnect``) and then cancels it: what Starlette's own
        ``__call__`` does with an anyio task group, whose making and cancelling cost the
        HTTP process more per request than everything of ours
        (benchmarks/serve_stack.py)."""
        task = asyncio.current_task()
        state = {"done": False, "left": False}

        async def watch() -> None:
            await client_left(receive)
            if not state["done"]:  # (the end of our own response wakes it too)
                state["left"] = True
                task.cancel()
        watcher = asyncio.ensure_future(watch())
        # a watcher that failed (its receive raised) has its exception taken, not logged
        # at exit as never retrieved; the stream then ends by itself
        watcher.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await self.stream_response(send)
            state["done"] = True
        except OSError:  # an ASGI 2.4 server's send to a client that left (Starlette's
            pass         # ClientDisconnect): the job is released by __call__
        except asyncio.CancelledError:
            if not state["left"]:
                raise
            # Python 3.11+: this cancel is handled here; another one (a shutdown) is not.
            # 3.10 has no uncancel: a shutdown's cancel that comes with the client's
            # leaving is taken as the leaving (the response ends either way)
            if hasattr(task, "uncancel") and task.uncancel() > 0:
                raise
        finally:
            state["done"] = True
            watcher.cancel()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class App:
    """The ASGI app: ``POST /v1/chat/completions`` and ``POST /v1/completions`` answered
    here, everything else (and those paths' other methods) by the FastAPI app ``api``.
    FastAPI's route machinery (dependencies, its middlewares, a wrapper per ``send``)
    cost the HTTP process more per request than the request's own work
    (benchmarks/serve_stack.py); what the two routes need of it is here: the ApiError
    answer and the request counter."""

    ROUTES = {"/v1/chat/completions": ("chat", "chat"),
              "/v1/completions": ("completion", "completions")}

    def __init__(self, api: FastAPI, server: Server):
        self.api, self.server = api, server

    async def __call__(self, scope, receive, send) -> None:
        route = (self.ROUTES.get(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "POST" else None)
        if route is None:
            return await self.api(scope, receive, send)
        kind, label = route
        try:
            resp = await self.server.complete(Request(scope, receive), kind)
        except ApiError as e:
            label, resp = "error", error_response(e)
        self.server.metrics.requests.labels(label, str(resp.status_code)).inc()
        await resp(scope, receive, send)


def build_app(server: Server) -> App:
    app = FastAPI(title="llamadist", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        server.metrics.requests.labels("error", str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, str(e.detail),
                                       kind="not_found_error" if e.status_code == 404
                                       else "invalid_request_error"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        resp = await server.complete(request, "chat")
        server.metrics.requests.labels("chat", str(resp.status_code)).inc()
        return resp

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        resp = await server.complete(request, "completion")
        server.metrics.requests.labels("completions", str(resp.status_code)).inc()
        return resp

    def model_card() -> dict:
        return {"id": server.config.model_name, "object": "model", "created": 0,
                "owned_by": "llamadist", "max_model_len": server.frontend.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")  # the openai client's models.retrieve
    async def model(request: Request, name: str) -> dict:
        server.check_key(request)
        if name != server.config.model_name:
            raise ApiError(404, f"model: {name!r} is not served here (this server serves "
                                f"{server.config.model_name!r})", "model", "not_found_error")
        return model_card()

    @app.get("/health")
    async def health() -> Response:
        """200 ok; 503 recovering (a lost worker being replaced: requests wait, none is
        lost) or error (the engine stopped, and why): the engine's process decides
        (serve.engine_host.EngineHost.health); 503 too when it does not answer."""
        try:
            status, body, headers = await server.frontend.engine.rpc("health")
        except (RuntimeError, TimeoutError, asyncio.TimeoutError) as e:
            why = str(e) or "the engine's process did not answer in time"
            return JSONResponse({"status": "error", "error": why}, status_code=503)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.post("/admin/drain")
    async def drain(request: Request) -> dict:
        return await server.admin(request, "drain")

    @app.post("/admin/undrain")
    async def undrain(request: Request) -> dict:
        return await server.admin(request, "undrain")

    @app.get("/metrics")
    async def metrics() -> Response:
        try:  # the engine's metrics, then this process's own
            text = await server.frontend.engine.rpc("metrics")
        except (RuntimeError, TimeoutError, asyncio.TimeoutError):
            text = b""
        return Response(text + server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        html = resources.files("llamadist.serve").joinpath("static/chat.html").read_text()
        return HTMLResponse(html)

    return App(app, server)
