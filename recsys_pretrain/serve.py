"""The HTTP service over recommend.py (FastAPI on uvicorn).

    GET  /recommend/{user_id}?k=10&category=C   a known user's top-k unseen items; unknown: popular, flagged
    POST /recommend  {"history": [...], "k": 10}  an anonymous session (oldest item first)
    GET  /similar/{item_id}?k=10                 items near an item
    GET  /health, GET /metadata                  liveness; the model, index, recall and limits served
    POST /admin/reload                           load the model and index again and swap them in
    GET  /docs, /openapi.json                    the OpenAPI description

Every error is JSON `{"error": "<field>: <what is wrong>"}` with a 4xx status (malformed JSON 400, a bad
field 422, an unknown item 404, a body over the limit 413).

A new index is swapped in without dropping a request: each request reads the current `Recommender` once
and uses that object to the end, while a reload builds the replacement beside it and then replaces one
reference. The old object lives on until its last request returns.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time, and
# some of them (the request model, the k bound) are built from the config inside create_app.
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys_pretrain.config import ServeConfig
from recsys_pretrain.recommend import Answer, Recommender

log = logging.getLogger(__name__)


class RecommenderHolder:
    """The served Recommender behind one reference; `reload()` builds a new one and swaps it in."""

    def __init__(self, loader: Callable[[], Recommender], watch: str | Path | None = None):
        self._loader = loader
        self._lock = threading.Lock()  # one reload at a time; readers never take it
        self._state = (loader(), 1)  # (recommender, version): swapped as one reference
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self._watch = Path(watch) if watch is not None else None
        self._signature = self._sign()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Recommender:
        return self._state[0]

    @property
    def version(self) -> int:
        return self._state[1]

    def snapshot(self) -> tuple[Recommender, int]:
        """(recommender, version) read once: a request sees the old pair or the new one, whole."""
        return self._state

    def reload(self) -> dict[str, Any]:
        with self._lock:
            signature = self._sign()
            try:
                new = self._loader()  # the slow part, while the old one keeps serving
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            self._state = (new, self.version + 1)
            self.loaded_at = time.time()
            self.last_error = None
            self._signature = signature
            return {"version": self.version, "loaded_at": self.loaded_at}

    def _sign(self) -> tuple | None:
        """Identity of the watched file (a pointer file, or an index directory's index.json): a rebuild
        through atomic_dir / atomic_path replaces it, which changes its inode and mtime."""
        if self._watch is None:
            return None
        try:
            st = (self._watch if self._watch.suffix == ".json" else self._watch / "index.json").stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def watch(self, every_s: float) -> None:
        """Poll the index directory in a daemon thread and reload when it has been rebuilt."""
        if self._watch is None or every_s <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(every_s):
                sig = self._sign()
                if sig is not None and sig != self._signature:
                    try:
                        self.reload()
                        log.info("index %s reloaded (version %d)", self._watch, self.version)
                    except Exception:  # keep serving the old index; /health shows the error
                        log.exception("reloading %s failed", self._watch)
                        self._signature = sig  # do not retry the same broken build in a loop

        self._thread = threading.Thread(target=loop, name="index-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class ItemOut(BaseModel):
    item_id: int | str
    score: float


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
    return Response(json.dumps(body, default=str), media_type="application/json")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _field(loc: tuple) -> str:
    # ("query", "k") -> "k"; ("body", "history", 3) -> "history[3]"; ("body",) -> "body"
    parts = [p for p in loc if p not in ("query", "path", "body")] or list(loc[:1])
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class BodyLimit:
    """Refuse a request whose declared body is over `limit` bytes before reading it (plain ASGI: no
    per-request task like Starlette's BaseHTTPMiddleware). A chunked body declares no size; the history's
    max_length still bounds what such a request can ask for."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length")
            if size is not None:
                if not size.isdigit():
                    return await _error(400, "content-length: not a number")(scope, receive, send)
                if int(size) > self.limit:
                    msg = f"body: {int(size)} bytes is over the limit of {self.limit}"
                    return await _error(413, msg)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(holder: RecommenderHolder, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    app = FastAPI(title="recsys-pretrain candidates",
                  description="Candidates from the pretrained model's FAISS index, in raw ids, seen items "
                              "excluded. See recsys_pretrain/serve.py.", version="1")

    class HistoryRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[int | str] = Field(max_length=cfg.max_history,
                                         description="raw item ids, oldest first; unknown ones are ignored")
        k: int = Field(cfg.default_k, ge=1, le=cfg.max_k)
        category: str | None = None

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            msg = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
            return _error(400, f"body: malformed JSON ({msg})")
        msgs = [f"{_field(tuple(e['loc']))}: {e['msg']}" for e in errors]
        return JSONResponse(status_code=422, content={"error": "; ".join(msgs), "detail": jsonable_encoder(errors)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    K = Annotated[int, Query(ge=1, le=cfg.max_k, description=f"how many items (1..{cfg.max_k})")]
    Category = Annotated[str | None, Query(max_length=200, description="only items of this category")]

    @app.get("/recommend/{user_id}", summary="a user's top-k unseen items", response_model=None,
              responses={200: {"model": AnswerOut}})
    def recommend_user(user_id: Annotated[str, PathParam(max_length=200)], k: K = cfg.default_k,
                       category: Category = None):
        rec, version = holder.snapshot()
        try:
            (ans,) = rec.recommend([user_id], k, category=category)
        except ValueError as exc:
            return _error(422, str(exc))
        return _answer(rec, ans, version, user_id=user_id, k=k)

    @app.post("/recommend", summary="top-k for an anonymous history", response_model=None,
              responses={200: {"model": AnswerOut}})
    def recommend_history(req: Annotated[HistoryRequest, Body()]):
        rec, version = holder.snapshot()
        try:
            (ans,) = rec.recommend_for_history([req.history], req.k, category=req.category)
        except ValueError as exc:
            return _error(422, str(exc))
        return _answer(rec, ans, version, k=req.k)

    @app.get("/similar/{item_id}", summary="items similar to an item", response_model=None,
              responses={200: {"model": AnswerOut}})
    def similar(item_id: Annotated[str, PathParam(max_length=200)], k: K = cfg.default_k,
                category: Category = None):
        rec, version = holder.snapshot()
        try:
            (ans,) = rec.similar_items([item_id], k, category=category)
        except ValueError as exc:
            return _error(422, str(exc))
        if ans.fallback == "unknown_item":
            return _error(404, f"item_id: unknown item {item_id!r}")
        return _answer(rec, ans, version, item_id=item_id, k=k)

    @app.get("/health", summary="liveness and what is loaded")
    def health():
        rec = holder.current
        return {"status": "ok", "items": rec.index.n_items, "users": rec.vocab.n_users,
                "index": rec.index.meta.get("resolved_factory"), "index_version": holder.version,
                "loaded_at": holder.loaded_at, "last_reload_error": holder.last_error}

    @app.get("/metadata", summary="the model, the index and its measured recall, the limits")
    def metadata():
        rec = holder.current
        return jsonable_encoder({**rec.metadata(), "index_version": holder.version, "limits": {
            "default_k": cfg.default_k, "max_k": cfg.max_k, "max_history": cfg.max_history,
            "max_body_bytes": cfg.max_body_bytes}})

    @app.post("/admin/reload", summary="load the model and index again and swap them in")
    def reload():
        try:
            return holder.reload()
        except Exception as exc:  # the old index keeps serving
            return _error(500, f"reload failed, still serving version {holder.version}: {exc}")

    return app


def sources(cfg: ServeConfig) -> tuple[str, str | None]:
    """(model, index) to load. `serve.index` may be a pointer file (`.json`, as the nightly flow publishes:
    {"model", "run_id", "path"}) naming both; its run id pins the model version the index was built from."""
    if cfg.index and cfg.index.endswith(".json"):
        try:
            ptr = json.loads(Path(cfg.index).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"serve.index: cannot read the pointer file {cfg.index}: {exc}") from None
        if "path" not in ptr:
            raise ValueError(f"serve.index: pointer file {cfg.index} has no 'path'")
        model = ptr.get("run_id") or ptr.get("model") or cfg.model
        if not model:
            raise ValueError(f"serve.index: pointer file {cfg.index} names no model and serve.model is unset")
        return str(model), str(ptr["path"])
    if not cfg.model:
        raise ValueError("serve.model: no model given (a directory, an MLflow run id or models:/NAME@ALIAS)")
    return cfg.model, cfg.index


def load_recommender(cfg: ServeConfig, tracking_uri: str | None = None) -> Recommender:
    """The Recommender the config names: model, index (or pointer file), categories, re-ranker."""
    model, index = sources(cfg)  # read each time: the pointer may have moved
    reranker = None
    if cfg.reranker:
        from recsys_pretrain.recommend import pyfunc_reranker
        from recsys_pretrain.tracking import load_pyfunc

        if not tracking_uri:
            raise ValueError("serve.reranker: an MLflow model URI needs a tracking_uri")
        reranker = pyfunc_reranker(load_pyfunc(cfg.reranker, tracking_uri), cfg.reranker_column)
    return Recommender.load(model, index, tracking_uri=tracking_uri, categories=cfg.categories,
                            reranker=reranker, reranker_name=cfg.reranker, rerank_pool=cfg.rerank_pool,
                            max_k=cfg.max_k, cache_dir=cfg.cache_dir)


def make_holder(cfg: ServeConfig, tracking_uri: str | None = None) -> RecommenderHolder:
    """The Recommender the config names, behind a holder that can reload it (and watch its index)."""
    sources(cfg)  # a bad configuration fails here, before anything loads

    def load() -> Recommender:
        return load_recommender(cfg, tracking_uri)

    if cfg.faiss_threads > 0:
        import faiss

        faiss.omp_set_num_threads(cfg.faiss_threads)
    holder = RecommenderHolder(load, watch=cfg.index)
    holder.watch(cfg.reload_poll_s)
    return holder


def make_server(app: FastAPI, cfg: ServeConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                         access_log=cfg.access_log, timeout_graceful_shutdown=10))


def serve(cfg: ServeConfig, tracking_uri: str | None = None) -> None:
    """Load, then serve until interrupted (binds cfg.host, 127.0.0.1 by default)."""
    holder = make_holder(cfg, tracking_uri)
    try:
        make_server(create_app(holder, cfg), cfg).run()
    finally:
        holder.close()
