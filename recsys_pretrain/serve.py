"""The HTTP service over recommend.py (FastAPI on uvicorn).

    GET  /recommend/{user_id}?k=10&category=C   a known user's top-k unseen items; unknown: popular, flagged
    POST /recommend  {"history": [...], "k": 10}  an anonymous session (oldest item first)
    GET  /similar/{item_id}?k=10                 items near an item
    GET  /health                                 liveness: 200 while the process runs; what is served, or
                                                 what it waits for
    GET  /ready                                  readiness: 200 once a model is loaded, 503 before
    GET  /metadata                               the model, index, recall and limits served
    POST /admin/reload                           load the model and index again and swap them in (admin)
    GET  /docs, /openapi.json                    the OpenAPI description

Every error is JSON `{"error": "<field>: <what is wrong>"}` with a 4xx status (malformed JSON 400, a bad
field 422, an unknown item 404, a body over the limit 413, headers too slow 408, headers too large 431); a
422 quotes at most a short excerpt of the input, never the input itself.

Admin: `Authorization: Bearer <token>` with `serve.admin_token` or $RECSYS_ADMIN_TOKEN (compared in constant
time). With no token set, the admin routes answer only a request that comes straight from loopback to a
server bound to loopback: its client address loopback and no X-Forwarded-For / Forwarded / X-Real-IP header
(a reverse proxy on the same host would otherwise open them to whoever reaches the proxy); 403 otherwise.
Admins also see filesystem paths (in /metadata and reload errors); others see them redacted.

Pseudonymised user ids: with `serve.user_key_env` / `serve.user_key_file` (the key of ingest's
pseudonymisation) /recommend/{user_id} takes a raw id and hashes it as ingest did; the key is read again
at every (re)load. Raw ids are then in request URLs: the access log is off by default, and when turned on
writes `<user>` in their place.

A new index is swapped in without dropping a request: each request reads the current `Recommender` once
and uses that object to the end, while a reload builds the replacement beside it and then replaces one
reference. The old object lives on until its last request returns.

Following what the nightly flow publishes: with `serve.index` a pointer file (`serving/current.json`) the
service polls it every `serve.reload_poll_s` and swaps in the model + index it names when it is replaced;
with `serve.model` an alias (`models:/NAME@ALIAS`) and no pointer, it re-resolves the alias on the same poll.
Before the first publication (no pointer file yet, no such alias yet) it starts anyway, not ready: /health
(liveness) answers 200 and says what it waits for, /ready answers 503 until a model is loaded, and the
recommendation routes and /metadata answer 503 with a Retry-After; the first publication is loaded at the
next poll.

Slow clients: uvicorn times out only idle keep-alive connections, so a client sending its headers a byte at
a time would hold a connection (and a `limit_concurrency` slot) forever. `_DeadlineH11Protocol` gives the
headers `serve.header_timeout_s` and the body `serve.body_timeout_s`.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time, and
# some of them (the request model, the k bound) are built from the config inside create_app.
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import reprlib
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import faiss
import h11
import uvicorn
from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from recsys_pretrain import privacy, registry
from recsys_pretrain.config import ServeConfig
from recsys_pretrain.recommend import Answer, Recommender, pyfunc_reranker

log = logging.getLogger(__name__)


class NotReadyError(RuntimeError):
    """Nothing is loaded yet: the source the service follows has not been published (see `waiting_for`)."""


RETRY_MAX_S = 300.0  # a load that failed is tried again after a backoff that doubles up to this


class RecommenderHolder:
    """The served Recommender behind one reference; `reload()` builds a new one and swaps it in.

    It may start empty (not ready): when `pending()` names something not there yet (the pointer file the
    nightly flow has not published, an alias nobody has set), nothing is loaded at construction, and the
    watcher loads it as soon as it appears. `signature()` is the identity of what is followed (a file's
    inode and mtime, an alias's version): the watcher reloads when it changes."""

    def __init__(self, loader: Callable[[], Recommender], watch: str | Path | None = None,
                 on_close: Callable[[], None] | None = None, *,
                 signature: Callable[[], Any] | None = None, pending: Callable[[], str | None] | None = None):
        self._loader = loader
        self._on_close = on_close  # e.g. remove the download cache; also run when the first load fails
        self._lock = threading.Lock()  # one reload at a time; readers never take it
        self._watch = Path(watch) if watch is not None else None
        self._signature_of = signature
        self._pending = pending or (lambda: None)
        self._state: tuple[Recommender | None, int] = (None, 0)  # (recommender, version): swapped as one reference
        self.loaded_at: float | None = None
        self.last_error: str | None = None
        self.waiting_for: str | None = None
        self._signature: Any = None
        self._failed: Any = None  # the signature whose load failed last, and when to try it again
        self._retry_at, self._failures = 0.0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.waiting_for = self._pending()
        except Exception as exc:  # e.g. the registry is unreachable: wait for it rather than exit
            self.waiting_for = f"the model source to be reachable ({type(exc).__name__})"
            self.last_error = f"{type(exc).__name__}: {exc}"
        if self.waiting_for is None:
            try:
                self._signature = self._sign()
                self._state = (loader(), 1)
            except BaseException:
                if on_close is not None:
                    on_close()
                raise
            self.loaded_at = time.time()

    @property
    def current(self) -> Recommender | None:
        """The served Recommender; None while not ready."""
        return self._state[0]

    @property
    def version(self) -> int:
        """Increments at every swap; 0 while nothing is loaded."""
        return self._state[1]

    @property
    def ready(self) -> bool:
        return self._state[0] is not None

    def snapshot(self) -> tuple[Recommender | None, int]:
        """(recommender, version) read once: a request sees the old pair or the new one, whole."""
        return self._state

    def reload(self) -> dict[str, Any]:
        """Load again and swap in; the old one keeps serving if it fails. NotReadyError while the followed
        source has not appeared yet."""
        with self._lock:
            if not self.ready:
                waiting = self._pending()
                if waiting is not None:
                    self.waiting_for = waiting
                    raise NotReadyError(f"not ready: waiting for {waiting}")
            signature = self._sign()
            try:
                new = self._loader()  # the slow part, while the old one keeps serving
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            self._state = (new, self.version + 1)
            self.loaded_at = time.time()
            self.last_error = self.waiting_for = None
            self._signature = signature
            self._failed, self._failures = None, 0
            return {"version": self.version, "loaded_at": self.loaded_at}

    def _sign(self) -> Any:
        return self._signature_of() if self._signature_of is not None else file_signature(self._watch)

    def poll(self, every_s: float = 0.0) -> bool:
        """One look at the followed source: load it when it first appears or has changed since the last load.
        A load that fails is not retried on the same signature before a backoff (from `every_s`, doubling up to
        RETRY_MAX_S): a broken build is not loaded in a loop, a transient failure is retried. True if swapped."""
        try:
            if not self.ready:
                self.waiting_for = self._pending()
                if self.waiting_for is not None:
                    return False
            sig = self._sign()
        except Exception as exc:  # the registry is unreachable for a moment: ask again at the next poll
            log.warning("could not check %s: %s: %s", self._watch or "the model source", type(exc).__name__, exc)
            return False
        if self.ready and (sig is None or sig == self._signature):
            return False
        if sig == self._failed and time.monotonic() < self._retry_at:
            return False
        try:
            self.reload()
        except NotReadyError:
            return False
        except Exception:  # keep serving the old one (if any); /health shows the error
            log.exception("loading %s failed; %s", self._watch or "the model",
                          f"still serving version {self.version}" if self.ready else "still not ready")
            self._failures += 1
            self._failed = sig
            self._retry_at = time.monotonic() + min(RETRY_MAX_S, max(every_s, 1.0) * 2 ** self._failures)
            return False
        log.info("%s loaded: version %d is served", self._watch or "the model", self.version)
        return True

    def watch(self, every_s: float) -> None:
        """Poll the followed source in a daemon thread (see `poll`)."""
        followed = self._watch is not None or self._signature_of is not None or not self.ready
        if every_s <= 0 or not followed:
            return

        def loop() -> None:
            while not self._stop.wait(every_s):
                self.poll(every_s)

        self._thread = threading.Thread(target=loop, name="model-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # not while a reload is downloading into the cache; a reload stuck past a minute is left to it
        if self._lock.acquire(timeout=60):
            try:
                if self._on_close is not None:
                    self._on_close()
                    self._on_close = None
            finally:
                self._lock.release()
        else:
            log.warning("a reload is still running: its download cache is left in place")


def file_signature(path: str | Path | None) -> tuple | None:
    """Identity of a watched file (a pointer file, or an index directory's index.json): a rebuild through
    atomic_dir / atomic_path replaces it, which changes its inode and mtime. None when absent."""
    if path is None:
        return None
    path = Path(path)
    try:
        st = (path if path.suffix == ".json" else path / "index.json").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ItemOut(BaseModel):
    item_id: int | str
    score: float | None = Field(description="null when the re-ranker gave no finite score")


class AnswerOut(BaseModel):
    """The response of the recommendation endpoints (documentation; the body is written directly)."""

    items: list[ItemOut]
    method: str = Field(description="user_vector | bert4rec_history | mean_item_vector | item_vector | popularity")
    fallback: str | None = Field(None, description="why popular items were served: unknown_user | no_known_items")
    unknown: list[int | str] = Field(description="ids in the query that the model does not know")
    reranked: bool
    reranker: str | None = Field(None, description="null: no fine-tuned ranker, the pretrained model's order")
    index_version: int = Field(description="increments each time a new index is swapped in")
    k: int
    user_id: str | None = None
    item_id: str | None = None


def _answer(rec: Recommender, ans: Answer, version: int, **query: Any) -> Response:
    # Serialised here rather than through FastAPI's jsonable_encoder, which cost ~0.5 ms a request (as much
    # as the search itself). `reranker` null says the fine-tuned ranker is absent.
    body = {**query, **ans.to_dict(), "reranker": rec.reranker_name if rec.reranker is not None else None,
            "index_version": version}
    for item in body["items"]:  # NaN / inf is not JSON: a re-ranker without an opinion on an item
        if not math.isfinite(item["score"]):
            item["score"] = None
    return Response(json.dumps(body, default=str), media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


# ---- what a client may see ----------------------------------------------------------------------------------
EXCERPT_CHARS = 100  # at most this much of a bad input is quoted back
MAX_ERRORS = 10  # validation errors listed in one answer
REDACTED = "<redacted>"
_excerpt_repr = reprlib.Repr()
_excerpt_repr.maxstring = _excerpt_repr.maxother = EXCERPT_CHARS
_excerpt_repr.maxlist = _excerpt_repr.maxdict = _excerpt_repr.maxtuple = 10
# URIs with a scheme and `//` (file:, sqlite:, postgresql://user:password@...), and absolute paths not
# preceded by a scheme's `:` (so models:/NAME@ALIAS and runs:/ID stay readable)
_URI = re.compile(r"\b[A-Za-z][\w+.-]*://[^\s'\"]*")
_ABS_PATH = re.compile(r"(?<![\w:/.~@<-])~?/[^\s'\",;:)\]}]+")


def _excerpt(value: Any) -> str:
    """A short quotation of a client's input: NaN, inf and a megabyte of text all become a few characters."""
    text = _excerpt_repr.repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def redact(text: str) -> str:
    """`text` without filesystem paths or URIs (which may carry a store's credentials)."""
    return _ABS_PATH.sub(REDACTED, _URI.sub(REDACTED, text))


def _is_mlflow_ref(source: str) -> bool:
    return source.startswith(("models:/", "runs:/")) or re.fullmatch(r"[0-9a-f]{32}", source) is not None


def public_metadata(meta: dict) -> dict:
    """Recommender.metadata() for a client that is not an admin: where things are on disk is left out."""
    src = meta.get("source") or {}
    model = str(src.get("model") or "")
    out = {**meta, "source": {"model": model if _is_mlflow_ref(model) else REDACTED,
                              "model_dir": REDACTED if src.get("model_dir") else None,
                              "index": REDACTED if src.get("index") else None,
                              **({"registered": src["registered"]} if src.get("registered") else {})}}

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return redact(x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    return walk(out)


def served_model(rec: Recommender, admin: bool) -> dict:
    """What /health and /ready say is served: the model, the MLflow run it was trained in, the registered
    model and version the nightly flow published (with a pointer file), where it was loaded from (a path:
    admins only)."""
    registered = rec.source.get("registered") or {}
    source = str(rec.source.get("model") or "")
    return {"name": rec.meta.get("model"), "run_id": rec.meta.get("run_id"), "registered": registered.get("model"),
            "version": registered.get("version"), "source": source if admin or _is_mlflow_ref(source) else REDACTED}


def _field(loc: tuple) -> str:
    # ("query", "k") -> "k"; ("body", "history", 3) -> "history[3]"; ("body",) -> "body". A name comes from
    # the client (an extra key): cut short.
    parts = [p for p in loc if p not in ("query", "path", "body")] or list(loc[:1])
    out = ""
    for p in parts:
        p = p if isinstance(p, int) else str(p)[:50]
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _validation_error(errors: list[dict]) -> JSONResponse:
    """422 naming each bad field with a short excerpt of what was sent; the input itself is never echoed
    (it may be a megabyte, or NaN / inf, which JSON cannot carry)."""
    detail = []
    for e in errors[:MAX_ERRORS]:
        item = {"field": _field(tuple(e.get("loc", ()))), "type": e.get("type"), "msg": str(e.get("msg"))}
        if "input" in e:
            item["input"] = _excerpt(e["input"])
        detail.append(item)
    msgs = [f"{d['field']}: {d['msg']}" + (f" (got {d['input']})" if "input" in d else "") for d in detail]
    if len(errors) > MAX_ERRORS:
        msgs.append(f"and {len(errors) - MAX_ERRORS} more")
    return JSONResponse(status_code=422, content={"error": "; ".join(msgs), "detail": detail})


def _not_bool(value: Any) -> Any:
    # JSON `true` is an int to pydantic's lax mode (k=1, item id 1): refused instead.
    if isinstance(value, bool):
        raise ValueError("a boolean is not accepted here")
    return value


# ---- admin ------------------------------------------------------------------------------------------------
ADMIN_TOKEN_ENV = "RECSYS_ADMIN_TOKEN"
MIN_ADMIN_TOKEN_CHARS = 16


def admin_token(cfg: ServeConfig) -> str | None:
    """The admin token: serve.admin_token, else $RECSYS_ADMIN_TOKEN; None when neither is set."""
    token = cfg.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    if token is not None and len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ValueError(f"serve.admin_token / {ADMIN_TOKEN_ENV}: at least {MIN_ADMIN_TOKEN_CHARS} characters "
                         "(e.g. `openssl rand -hex 32`)")
    return token


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (not 0.0.0.0 or '', which are every interface)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Headers a proxy adds: a request carrying one came through a proxy, whatever address it connects from.
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


class AdminGuard:
    """Who may use the admin routes: the holder of the token; with no token, a request straight from
    loopback (its client address loopback, no proxy header) to a loopback-bound server (the local-development
    default), and nobody otherwise. The bind alone is not enough: a reverse proxy on the same host connects
    from loopback on behalf of anyone who reaches it."""

    def __init__(self, token: str | None, host: str):
        # compared as digests: equal lengths, so the comparison's time tells nothing, the length included
        self._token = hashlib.sha256(token.encode()).digest() if token is not None else None
        self._open = token is None and is_loopback(host)

    def refuse(self, request: Request) -> JSONResponse | None:
        """None when the request may act as an admin, else the error to answer with."""
        if self._token is None:
            if not self._open:
                return _error(403, f"admin: the admin routes are off: set serve.admin_token or {ADMIN_TOKEN_ENV} "
                                   "(the server is not bound to loopback)")
            client = request.client.host if request.client is not None else ""
            if not is_loopback(client) or any(h in request.headers for h in PROXY_HEADERS):
                return _error(403, f"admin: without serve.admin_token or {ADMIN_TOKEN_ENV} the admin routes answer "
                                   "only local clients connecting directly, not through a proxy")
            return None
        scheme, _, got = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not got.strip():
            return _error(401, "authorization: an admin token is required (Authorization: Bearer <token>)",
                          headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(hashlib.sha256(got.strip().encode()).digest(), self._token):
            return _error(401, "authorization: wrong admin token",
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None

    def allows(self, request: Request) -> bool:
        return self.refuse(request) is None


# ---- request limits ---------------------------------------------------------------------------------------
class RequestLimits:
    """Refuse headers over `header_limit` bytes (431; h11's own limit binds only headers that arrive in
    pieces) and a body over `limit` bytes: at once when its content-length says so, else (a chunked body
    declares no size) while it is read, with 413 as soon as the count passes the limit. Plain ASGI: no
    per-request task like Starlette's BaseHTTPMiddleware."""

    def __init__(self, app, limit: int, header_limit: int):
        self.app, self.limit, self.header_limit = app, limit, header_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        head += sum(len(k) + len(v) + 4 for k, v in scope["headers"])  # "k: v\r\n"
        if head > self.header_limit:
            msg = f"headers: {head} bytes is over the limit of {self.header_limit}"
            return await _error(431, msg)(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None:
            if not size.isdigit():
                return await _error(400, "content-length: not a number")(scope, receive, send)
            if int(size) > self.limit:
                msg = f"body: {int(size)} bytes is over the limit of {self.limit}"
                return await _error(413, msg)(scope, receive, send)
        received, over, replaced = 0, "", False

        async def counted_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = f"body: over the limit of {self.limit} bytes"
                    # FastAPI re-raises an HTTPException met while reading the body; the handler answers it
                    raise StarletteHTTPException(413, over)
            return message

        async def guarded_send(message):
            # Whatever else the app makes of the interrupted read, the client hears 413.
            nonlocal replaced
            if over and message["type"] == "http.response.start" and message["status"] != 413:
                replaced = True
                return await _error(413, over)(scope, receive, send)
            if not replaced:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


class _DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines. uvicorn times out an idle keep-alive connection only,
    and any byte received cancels that timer: a client sending its headers (or its body) a byte at a time
    holds a connection forever. Here a request's line and headers must be in within `header_timeout_s` of
    the connection (first request) or of the request's first byte (later ones), else 408 and the
    connection is closed; its body must then be in within `body_timeout_s`, else the connection is closed.
    make_server subclasses this with the config's values."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def connection_made(self, transport) -> None:
        self._deadline: Any = None  # asyncio.TimerHandle
        self._phase = ""
        super().connection_made(transport)
        self._arm("headers", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # a new request after keep-alive
            self._arm("headers", self.header_timeout_s)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse a pipelined request
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.body_timeout_s)
        elif state is not h11.IDLE:  # DONE (read in full), or closing / closed / in error
            self._disarm()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expired(self) -> None:
        phase = self._phase
        self._deadline, self._phase = None, ""
        if self.transport.is_closing():
            return
        if phase == "headers" and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            body = json.dumps({"error": f"headers: not received within {self.header_timeout_s:g} s"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.logger.info("closing a connection whose %s did not arrive in time", phase or "request")
        self.transport.close()


def create_app(holder: RecommenderHolder, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    guard = AdminGuard(admin_token(cfg), cfg.host)
    app = FastAPI(title="recsys-pretrain candidates",
                  description="Candidates from the pretrained model's FAISS index, in raw ids, seen items "
                              "excluded. See recsys_pretrain/serve.py.", version="1")
    ItemId = Annotated[int | str, BeforeValidator(_not_bool)]
    started_at = time.time()  # with /health's loaded_at: a swap without a restart keeps this one

    class HistoryRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[ItemId] = Field(max_length=cfg.max_history,
                                      description="raw item ids, oldest first; unknown ones are ignored")
        k: Annotated[int, BeforeValidator(_not_bool)] = Field(cfg.default_k, ge=1, le=cfg.max_k)
        category: str | None = Field(None, max_length=200)

    app.add_middleware(RequestLimits, limit=cfg.max_body_bytes, header_limit=cfg.max_header_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            msg = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
            return _error(400, f"body: malformed JSON ({msg})")
        return _validation_error(list(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Logged by uvicorn with its traceback; the client learns nothing about the server's insides.
        return _error(500, "internal: the server failed to answer this request (see its log)")

    def client_error(status: int, exc: Exception) -> JSONResponse:
        return _error(status, _excerpt_text(redact(str(exc))))

    retry_after = str(max(1, math.ceil(cfg.reload_poll_s or 5)))

    def waiting_for(request: Request) -> str:
        what = holder.waiting_for or "a model to be loaded (POST /admin/reload)"
        return what if guard.allows(request) else redact(what)

    def not_ready(request: Request) -> JSONResponse:
        """503 while nothing is loaded: what it waits for (paths for admins only), and when to ask again."""
        what = waiting_for(request)
        return JSONResponse(status_code=503, headers={"Retry-After": retry_after},
                            content={"error": f"not ready: no model is loaded yet, waiting for {what}; "
                                              "GET /ready answers 200 once one is", "ready": False,
                                     "waiting_for": what})

    K = Annotated[int, Query(ge=1, le=cfg.max_k, description=f"how many items (1..{cfg.max_k})")]
    Category = Annotated[str | None, Query(max_length=200, description="only items of this category")]

    @app.get("/recommend/{user_id}", summary="a user's top-k unseen items", response_model=None,
              responses={200: {"model": AnswerOut}})
    def recommend_user(request: Request, user_id: Annotated[str, PathParam(max_length=200)], k: K = cfg.default_k,
                       category: Category = None):
        rec, version = holder.snapshot()
        if rec is None:
            return not_ready(request)
        try:
            (ans,) = rec.recommend([user_id], k, category=category)
        except ValueError as exc:
            return client_error(422, exc)
        return _answer(rec, ans, version, user_id=user_id, k=k)

    @app.post("/recommend", summary="top-k for an anonymous history", response_model=None,
              responses={200: {"model": AnswerOut}})
    def recommend_history(req: Annotated[HistoryRequest, Body()], request: Request):
        rec, version = holder.snapshot()
        if rec is None:
            return not_ready(request)
        try:
            (ans,) = rec.recommend_for_history([req.history], req.k, category=req.category)
        except ValueError as exc:
            return client_error(422, exc)
        return _answer(rec, ans, version, k=req.k)

    @app.get("/similar/{item_id}", summary="items similar to an item", response_model=None,
              responses={200: {"model": AnswerOut}})
    def similar(request: Request, item_id: Annotated[str, PathParam(max_length=200)], k: K = cfg.default_k,
                category: Category = None):
        rec, version = holder.snapshot()
        if rec is None:
            return not_ready(request)
        try:
            (ans,) = rec.similar_items([item_id], k, category=category)
        except ValueError as exc:
            return client_error(422, exc)
        if ans.fallback == "unknown_item":
            return _error(404, f"item_id: unknown item {_excerpt(item_id)}")
        return _answer(rec, ans, version, item_id=item_id, k=k)

    @app.get("/health", summary="liveness: 200 while the process runs; what is served, or what it waits for")
    def health(request: Request):
        rec, version = holder.snapshot()
        admin = guard.allows(request)
        error = holder.last_error
        if error is not None and not admin:
            error = f"{error.split(':', 1)[0]} (the details need the admin token)"
        body = {"status": "ok" if rec is not None else "waiting", "ready": rec is not None,
                "waiting_for": waiting_for(request) if rec is None else None,
                "model": served_model(rec, admin) if rec is not None else None,
                "items": rec.index.n_items if rec is not None else None,
                "users": rec.vocab.n_users if rec is not None else None,
                "index": rec.index.meta.get("resolved_factory") if rec is not None else None,
                "index_version": version, "loaded_at": holder.loaded_at, "started_at": started_at,
                "last_reload_error": error}
        return body

    @app.get("/ready", summary="readiness: 200 once a model is loaded, 503 (saying what it waits for) before")
    def ready(request: Request):
        rec, version = holder.snapshot()
        if rec is None:
            return not_ready(request)
        return {"ready": True, "index_version": version, "model": served_model(rec, guard.allows(request))}

    @app.get("/metadata", summary="the model, the index and its measured recall, the limits (paths: admins)")
    def metadata(request: Request):
        rec, version = holder.snapshot()
        if rec is None:
            return not_ready(request)
        meta = rec.metadata() if guard.allows(request) else public_metadata(rec.metadata())
        return jsonable_encoder({**meta, "index_version": version, "limits": {
            "default_k": cfg.default_k, "max_k": cfg.max_k, "max_history": cfg.max_history,
            "max_body_bytes": cfg.max_body_bytes}})

    @app.post("/admin/reload", summary="load the model and index again and swap them in (admin token)")
    def reload(request: Request):
        if (refused := guard.refuse(request)) is not None:
            return refused
        try:
            return holder.reload()
        except NotReadyError:
            return not_ready(request)
        except Exception as exc:  # the old index keeps serving
            still = f"still serving version {holder.version}" if holder.ready else "still not ready"
            return _error(500, f"reload failed, {still}: {exc}")

    return app


def _excerpt_text(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---- loading ------------------------------------------------------------------------------------------------
def pointer_file(cfg: ServeConfig) -> str | None:
    """serve.index when it is a pointer file (`.json`, as the nightly flow publishes), else None."""
    return cfg.index if cfg.index and cfg.index.endswith(".json") else None


# what a pointer file says beside its paths, kept with the Recommender loaded from it (/health shows it)
PUBLISHED_KEYS = ("model", "version", "run_id", "index_run_id", "recall_at_10")


def _sources(cfg: ServeConfig) -> tuple[str, str | None, dict | None]:
    """(model, index, pointer file contents or None), the pointer read once."""
    pointer = pointer_file(cfg)
    if pointer is not None:
        try:
            ptr = json.loads(Path(pointer).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"serve.index: cannot read the pointer file {pointer}: {exc}") from None
        if not isinstance(ptr, dict) or "path" not in ptr:
            raise ValueError(f"serve.index: pointer file {pointer} has no 'path'")
        model = ptr.get("run_id") or ptr.get("model") or cfg.model
        if not model:
            raise ValueError(f"serve.index: pointer file {pointer} names no model and serve.model is unset")
        return str(model), str(ptr["path"]), ptr
    if not cfg.model:
        raise ValueError("serve.model: no model given (a directory, an MLflow run id or models:/NAME@ALIAS)")
    return cfg.model, cfg.index, None


def sources(cfg: ServeConfig) -> tuple[str, str | None]:
    """(model, index) to load. `serve.index` may be a pointer file (`.json`, as the nightly flow publishes:
    {"model", "run_id", "path"}) naming both; its run id pins the model version the index was built from."""
    return _sources(cfg)[:2]


def followed_alias(cfg: ServeConfig) -> tuple[str, str] | None:
    """(name, alias) when serve.model is models:/NAME@ALIAS and no pointer file names the model: the alias
    the service re-resolves on its poll."""
    if pointer_file(cfg) is not None or not (cfg.model or "").startswith("models:/"):
        return None
    name, sep, alias = cfg.model[len("models:/"):].partition("@")
    return (name, alias) if sep and name and alias else None


def trusted_reranker(uri: str, trusted: tuple[str, ...]) -> tuple[str, str | None, str | None]:
    """(name, alias, version), one of the last two None, of a re-ranker URI naming a trusted registered
    model; else ValueError.

    A re-ranker is an MLflow pyfunc, and loading one unpickles (cloudpickle) and so runs whatever code it
    was logged with. Whoever can register a version or move an alias of a trusted name can therefore run
    code in the service: restrict that in MLflow (its basic-auth permissions). Run ids, runs:/ URIs, paths,
    logged-model ids (models:/m-...) and other names are refused."""
    why = (f"serve.reranker: {uri!r} is refused: loading a re-ranker runs its code, so only a registered "
           f"model named in serve.trusted_reranker_names ({', '.join(trusted) or 'none'}) is loaded, as "
           "models:/NAME@ALIAS or models:/NAME/VERSION")
    if not uri.startswith("models:/"):
        raise ValueError(why)
    rest = uri[len("models:/"):]
    name, sep, alias = rest.partition("@")
    if sep:
        version = None
    else:
        name, sep, version = rest.rpartition("/")
        alias = None
        if not sep or not version.isdigit():
            raise ValueError(why)
    if not name or not (alias or version) or name not in trusted:
        raise ValueError(why)
    return name, alias, version


def serve_user_key(cfg: ServeConfig) -> bytes | None:
    """The key serve.user_key_env / serve.user_key_file point at (None when neither is set); errors name the
    variable or the file, never the key."""
    if cfg.user_id_type not in ("str", "int"):
        raise ValueError(f"serve.user_id_type must be 'str' or 'int', got {cfg.user_id_type!r}")
    try:
        return privacy.load_key(cfg.user_key_env, cfg.user_key_file)
    except privacy.PrivacyError as exc:
        raise privacy.PrivacyError(f"serve.user_key_env / serve.user_key_file: {exc}") from None


def load_recommender(cfg: ServeConfig, tracking_uri: str | None = None, *, cache_dir: str | Path | None = None,
                     rerankers: dict | None = None) -> Recommender:
    """The Recommender the config names: model, index (or pointer file), categories, re-ranker, and the user
    key (serve.user_key_env / _file, read now: then user ids are raw ones, hashed as ingest hashed them).

    MLflow models are downloaded into `cache_dir` (else serve.cache_dir, else a temp directory removed once
    the model is in memory). `rerankers` keeps the loaded re-ranker by registered version between calls, so
    a reload downloads and unpickles one only when its alias has moved."""
    user_key = serve_user_key(cfg)  # privacy: never logged; a reload reads it again
    model, index, published = _sources(cfg)  # read each time: the pointer may have moved
    cache = cache_dir if cache_dir is not None else cfg.cache_dir
    reranker = None
    if cfg.reranker:
        reranker = _load_reranker(cfg, tracking_uri, rerankers, cache)
    tmp = tempfile.TemporaryDirectory(prefix="recsys-model-") if cache is None else None
    try:
        rec = Recommender.load(model, index, tracking_uri=tracking_uri, categories=cfg.categories,
                               reranker=reranker, reranker_name=cfg.reranker, rerank_pool=cfg.rerank_pool,
                               max_k=cfg.max_k, cache_dir=tmp.name if tmp is not None else cache,
                               user_key=user_key, user_id_type=cfg.user_id_type)
    finally:
        if tmp is not None:  # everything is read into memory by now
            tmp.cleanup()
    if user_key is not None and rec.vocab.n_users and not privacy.looks_pseudonymised(rec.vocab.users):
        raise ValueError("serve.user_key_env / serve.user_key_file: a user key is set, but the model's user ids "
                         "are not pseudonymised (ingested without a key): no raw id would be found")
    if published is not None:  # the registered version the flow published, shown by /health and /metadata
        rec.source["registered"] = {k: published.get(k) for k in PUBLISHED_KEYS}
    return rec


RERANKER_DIR = "rerankers"  # in the download cache: one directory per loaded re-ranker


def _load_reranker(cfg: ServeConfig, tracking_uri: str | None, rerankers: dict | None,
                   cache: str | Path | None = None):
    name, alias, version = trusted_reranker(cfg.reranker, cfg.trusted_reranker_names)
    if not tracking_uri:
        raise ValueError("serve.reranker: an MLflow model URI needs a tracking_uri")
    if alias is not None:
        found = registry.get_alias_version(name, alias, tracking_uri)
        if found is None:
            raise FileNotFoundError(f"serve.reranker: no registered model {name!r} with alias {alias!r}")
        version = str(found["version"])
    key = (name, version)
    if rerankers is not None and key in rerankers:
        return rerankers[key]
    # Downloaded into the server's cache (else one temp directory), never into a temp directory MLflow would
    # leave behind at every load; the directory goes with the re-ranker: once no Recommender holds it (a
    # reload moved on and the last request on the old one returned), or at exit.
    if cache is not None:
        parent = Path(cache) / RERANKER_DIR
        parent.mkdir(parents=True, exist_ok=True)
        dst = Path(tempfile.mkdtemp(prefix=f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-v{version}-", dir=parent))
    else:
        dst = Path(tempfile.mkdtemp(prefix="recsys-reranker-"))
    try:
        # the version itself, not the alias: what was checked is what is loaded, even if the alias moves now
        reranker = pyfunc_reranker(registry.load_pyfunc(f"models:/{name}/{version}", tracking_uri, dst_path=dst),
                                   cfg.reranker_column)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    weakref.finalize(reranker, shutil.rmtree, str(dst), True)
    if rerankers is not None:
        rerankers.clear()  # only the one served is kept
        rerankers[key] = reranker
    return reranker


def _prune_cache(cache: Path, rec: Recommender) -> None:
    """Remove the cache's downloads other than the served model's (it is in memory; they are old runs) and
    the re-rankers' directory (each removed with its re-ranker); cut-off downloads (.tmp-*) go too."""
    model_dir = rec.source.get("model_dir")
    keep = {Path(model_dir).parent.resolve()} if model_dir else set()
    keep.add((cache / RERANKER_DIR).resolve())
    for entry in cache.iterdir():
        if entry.resolve() not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def make_holder(cfg: ServeConfig, tracking_uri: str | None = None) -> RecommenderHolder:
    """The Recommender the config names, behind a holder that can reload it and follows its source every
    serve.reload_poll_s: the pointer file (serve.index `.json`), else the index directory and the model's alias
    (serve.model `models:/NAME@ALIAS`). A pointer file not yet published, or an alias not yet set, is waited
    for: the holder starts empty (not ready) and loads it when it appears.

    MLflow downloads go to serve.cache_dir, or to one temp directory for the holder's lifetime: a reload of
    the same run finds it there, older runs are pruned after each load, and close() removes it."""
    pointer = pointer_file(cfg)
    if pointer is None:
        sources(cfg)  # a bad configuration fails here, before anything loads
    if cfg.reranker:
        trusted_reranker(cfg.reranker, cfg.trusted_reranker_names)
    admin_token(cfg)
    serve_user_key(cfg)

    own_cache = cfg.cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="recsys-serve-cache-")) if own_cache else Path(cfg.cache_dir)
    rerankers: dict = {}

    alias = followed_alias(cfg)

    def alias_version() -> int | None:
        found = registry.get_alias_version(alias[0], alias[1], tracking_uri)
        return None if found is None else int(found["version"])

    def load() -> Recommender:
        version = alias_version() if alias is not None and tracking_uri else None
        if version is None:
            rec = load_recommender(cfg, tracking_uri, cache_dir=cache, rerankers=rerankers)
        else:  # the version the alias names now, loaded as such and shown by /health
            rec = load_recommender(replace(cfg, model=f"models:/{alias[0]}/{version}"), tracking_uri,
                                   cache_dir=cache, rerankers=rerankers)
            rec.source.update(model=cfg.model, registered={"model": cfg.model, "version": version})
        if own_cache:
            _prune_cache(cache, rec)
        return rec

    def close() -> None:
        rerankers.clear()
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)

    if cfg.faiss_threads > 0:
        faiss.omp_set_num_threads(cfg.faiss_threads)
    def pending() -> str | None:
        if pointer is not None:
            return None if Path(pointer).exists() else (
                f"the first publication of the pointer file {pointer} (serve.index; the nightly flow writes it)")
        if alias is not None and tracking_uri and alias_version() is None:
            return f"registered model {alias[0]!r} to have an alias {alias[1]!r} (models:/{alias[0]}@{alias[1]})"
        return None

    def signature() -> Any:
        if alias is not None and tracking_uri:
            return file_signature(cfg.index), alias_version()
        return file_signature(cfg.index)

    holder = RecommenderHolder(load, watch=cfg.index, on_close=close, pending=pending,
                               signature=signature if alias is not None else None)
    if not holder.ready:
        log.warning("not ready: waiting for %s (checked every %g s)", holder.waiting_for, cfg.reload_poll_s)
        if cfg.reload_poll_s <= 0:
            log.warning("serve.reload_poll_s is 0: nothing is loaded until POST /admin/reload")
    holder.watch(cfg.reload_poll_s)
    return holder


_USER_IN_PATH = re.compile(r"(/recommend/)[^?\s]+")


class UserIdRedactor(logging.Filter):
    """uvicorn's access log with `<user>` for the user id of /recommend/{user_id} (a raw id when a user key
    is configured)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], _USER_IN_PATH.sub(r"\1<user>", args[2]), *args[3:])
        return True


def make_server(app: FastAPI, cfg: ServeConfig):
    protocol = type("DeadlineH11Protocol", (_DeadlineH11Protocol,),
                    {"header_timeout_s": cfg.header_timeout_s, "body_timeout_s": cfg.body_timeout_s})
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level="info", access_log=cfg.access_log,
        timeout_graceful_shutdown=10, http=protocol, timeout_keep_alive=cfg.keep_alive_s,
        h11_max_incomplete_event_size=cfg.max_header_bytes, limit_concurrency=cfg.limit_concurrency or None))
    if cfg.access_log and (cfg.user_key_env or cfg.user_key_file):  # privacy: raw user ids are in the URLs
        access = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, UserIdRedactor) for f in access.filters):
            access.addFilter(UserIdRedactor())
    return server


def _log_to_stderr() -> None:
    """This module's messages (waiting, swapped, a failed reload) on stderr beside uvicorn's, in a server
    process that configured no logging of its own."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def serve(cfg: ServeConfig, tracking_uri: str | None = None) -> None:
    """Load (or, before the first publication, wait for it), then serve until interrupted (binds cfg.host,
    127.0.0.1 by default)."""
    _log_to_stderr()
    holder = make_holder(cfg, tracking_uri)
    try:
        make_server(create_app(holder, cfg), cfg).run()
    finally:
        holder.close()
