"""The HTTP service on a real uvicorn server on a free 127.0.0.1 port: good and bad requests, hot swap."""

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from recsys_pretrain.config import IndexConfig, ServeConfig, load_config
from recsys_pretrain.index import build_model_index
from recsys_pretrain.recommend import Recommender
from recsys_pretrain.serve import ADMIN_TOKEN_ENV, create_app, make_holder, make_server
from recsys_pretrain.train.pretrain import pretrain

STARTUP_S = 30  # bounded waits: a server that does not come up fails the test instead of hanging it


def _index(model_dir, out, factory):
    return build_model_index(model_dir, out, IndexConfig(factory=factory, tune_queries=50, tune_latency_queries=5))


def tiny_mf(prepared, root):
    """A small MF model directory trained on the tiny log (4 epochs, dim 16)."""
    cfg = load_config(None, ["pretrain.model=mf", "pretrain.mf.dim=16", "pretrain.mf.train.epochs=4",
                             "pretrain.mf.train.progress=false"]).pretrain
    return pretrain(prepared, cfg, root / "run").model_dir


@contextmanager
def running(app, cfg):
    """uvicorn serving `app` with `cfg`'s limits on a free 127.0.0.1 port, in a thread: yields (server, base
    URL), and stops it after (bounded waits: a server that does not come up or stop fails the test)."""
    server = make_server(app, cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held by us until uvicorn takes the socket
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_S
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def served(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_mf(tiny_prepared["prepared"], root)
    _index(model_dir, root / "index", "HNSW16")
    scfg = ServeConfig(model=str(model_dir), index=str(root / "index"), port=0, max_history=50,
                       max_body_bytes=20_000, categories=str(tiny_prepared["ingested"] / "events.parquet"),
                       reload_poll_s=0.2)
    holder = make_holder(scfg)
    with pytest.MonkeyPatch.context() as mp:  # no admin token: the admin route is open on loopback
        mp.delenv(ADMIN_TOKEN_ENV, raising=False)
        app = create_app(holder, scfg)
    try:
        with running(app, scfg) as (_, url), httpx.Client(base_url=url, timeout=10) as client:
            yield {"client": client, "holder": holder, "model_dir": model_dir, "root": root,
                   "rec": Recommender.load(model_dir, root / "index")}
    finally:
        holder.close()


def test_binds_loopback_by_default():
    assert ServeConfig().host == "127.0.0.1"


def test_health_metadata_openapi(served):
    c = served["client"]
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["index"] == "HNSW16" and h["items"] == served["rec"].vocab.n_items
    m = c.get("/metadata").json()
    assert m["index"]["recall"]["recall_at_10"] >= 0.9 and m["index"]["search"]["param"] == "efSearch"
    assert m["reranker"] is None and m["limits"]["max_k"] == 1000
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/recommend/{user_id}", "/recommend", "/similar/{item_id}", "/health", "/metadata"} <= set(paths)
    assert c.get("/docs").status_code == 200


def test_recommend_user(served):
    c, rec = served["client"], served["rec"]
    user = rec.vocab.user_ids([5])[0]
    r = c.get(f"/recommend/{user}", params={"k": 7})
    assert r.status_code == 200
    body = r.json()
    (want,) = rec.recommend([user], k=7)
    assert [i["item_id"] for i in body["items"]] == want.ids
    assert body["method"] == "user_vector" and body["fallback"] is None and body["reranker"] is None
    assert c.get(f"/recommend/{user}").json()["k"] == 10  # the default
    unknown = c.get("/recommend/no-such-user", params={"k": 3}).json()
    assert unknown["fallback"] == "unknown_user" and unknown["method"] == "popularity"
    assert len(unknown["items"]) == 3 and unknown["unknown"] == ["no-such-user"]


@pytest.mark.parametrize("k", ["-1", "0", "1001", "100000000000000000000000", "abc", "2.5"])
def test_bad_k_is_422_naming_k(served, k):
    r = served["client"].get("/recommend/1", params={"k": k})
    assert r.status_code == 422 and r.json()["error"].startswith("k: ")
    r = served["client"].get("/similar/1", params={"k": k})
    assert r.status_code == 422 and r.json()["error"].startswith("k: ")


def test_post_history(served):
    c, rec = served["client"], served["rec"]
    items = rec.vocab.item_ids([1, 2, 3])
    r = c.post("/recommend", json={"history": [*items, "nope"], "k": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["method"] == "mean_item_vector" and body["unknown"] == ["nope"]
    assert [i["item_id"] for i in body["items"]] == rec.recommend_for_history([items], k=4)[0].ids
    empty = c.post("/recommend", json={"history": []}).json()
    assert empty["fallback"] == "no_known_items" and len(empty["items"]) == 10


@pytest.mark.parametrize("payload,status,field", [
    (b'{"history": [1, 2,', 400, "body: malformed JSON"),
    (b"not json at all", 400, "body: malformed JSON"),
    (json.dumps({"history": list(range(51))}).encode(), 422, "history: "),  # over max_history (50)
    (json.dumps({"history": [1.5]}).encode(), 422, "history[0]"),
    (json.dumps({"history": [{"id": 1}]}).encode(), 422, "history[0]"),
    (json.dumps({"k": 3}).encode(), 422, "history: "),
    (json.dumps({"history": [1], "k": -3}).encode(), 422, "k: "),
    (json.dumps({"history": [1], "k": 5000}).encode(), 422, "k: "),
    (json.dumps({"history": [1], "user": 3}).encode(), 422, "user: "),
    (json.dumps({"history": [1], "category": "no-such-category"}).encode(), 422, "category: "),
    (json.dumps([1, 2]).encode(), 422, "body"),
])
def test_post_bad_requests(served, payload, status, field):
    r = served["client"].post("/recommend", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert field in r.json()["error"]


def test_oversized_body_is_413(served):
    big = json.dumps({"history": ["x" * 100] * 300}).encode()  # ~31 kB, over the 20 kB limit
    r = served["client"].post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["error"]


def test_similar(served):
    c, rec = served["client"], served["rec"]
    item = rec.vocab.item_ids([4])[0]
    body = c.get(f"/similar/{item}", params={"k": 5}).json()
    assert [i["item_id"] for i in body["items"]] == rec.similar_items([item], k=5)[0].ids
    r = c.get("/similar/no-such-item")
    assert r.status_code == 404 and r.json()["error"].startswith("item_id: unknown item")


def test_category(served):
    c, rec = served["client"], served["rec"]
    cat = served["holder"].current.category_names[0]
    user = rec.vocab.user_ids([1])[0]
    body = c.get(f"/recommend/{user}", params={"k": 3, "category": cat}).json()
    codes = served["holder"].current.categories
    idx = rec.vocab.item_index([i["item_id"] for i in body["items"]])
    assert (codes[idx] == codes[idx[0]]).all()
    r = c.get(f"/recommend/{user}", params={"category": "no-such-category"})
    assert r.status_code == 422 and r.json()["error"].startswith("category: ")


def test_index_swapped_without_dropping_requests(served):
    c, holder, root = served["client"], served["holder"], served["root"]
    users = served["rec"].vocab.user_ids(np.arange(20))
    errors, versions, stop = [], [], threading.Event()

    def load(n):
        with httpx.Client(base_url=c.base_url, timeout=10) as cl:
            i = 0
            while not stop.is_set():
                r = cl.get(f"/recommend/{users[(n + i) % len(users)]}", params={"k": 5})
                i += 1
                if r.status_code != 200 or len(r.json()["items"]) != 5:
                    errors.append((r.status_code, r.text))
                else:
                    versions.append(r.json()["index_version"])

    threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        v0 = holder.version
        # 1. the index directory is rebuilt (atomically) as Flat: the watcher swaps it in
        _index(served["model_dir"], root / "index", "Flat")
        deadline = time.monotonic() + 20
        while c.get("/health").json()["index"] != "Flat":
            assert time.monotonic() < deadline, "the rebuilt index was not picked up"
            time.sleep(0.1)
        # 2. an explicit reload
        r = c.post("/admin/reload")
        assert r.status_code == 200 and r.json()["version"] > v0 + 1
        # 3. a broken rebuild: the reload fails, and the old index keeps serving
        meta = root / "index" / "index.json"
        good = meta.read_text()
        meta.write_text(json.dumps({**json.loads(good), "n_items": 1}))
        r = c.post("/admin/reload")
        assert r.status_code == 500 and "still serving" in r.json()["error"]
        assert c.get("/recommend/1").status_code == 200
        meta.write_text(good)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
    assert not errors, errors[:3]
    assert len(versions) > 10 and max(versions) > v0  # requests kept flowing and saw the new index


def test_pointer_file_names_model_and_index_and_is_watched(served, tmp_path):
    from recsys_pretrain.io import write_json

    model_dir = served["model_dir"]
    _index(model_dir, tmp_path / "v1", "HNSW16")
    _index(model_dir, tmp_path / "v2", "Flat")
    pointer = tmp_path / "current.json"
    write_json(pointer, {"model": str(model_dir), "path": str(tmp_path / "v1")})  # as the nightly flow writes it
    holder = make_holder(ServeConfig(index=str(pointer), reload_poll_s=0.1))
    try:
        assert holder.current.index.meta["resolved_factory"] == "HNSW16"
        write_json(pointer, {"model": str(model_dir), "path": str(tmp_path / "v2")})
        deadline = time.monotonic() + 10
        while holder.current.index.meta["resolved_factory"] != "Flat":
            assert time.monotonic() < deadline, "the moved pointer was not followed"
            time.sleep(0.05)
        assert holder.version == 2
    finally:
        holder.close()
    with pytest.raises(ValueError, match="serve.model"):
        make_holder(ServeConfig())
    pointer.write_text("{}")
    with pytest.raises(ValueError, match="no 'path'"):
        make_holder(ServeConfig(index=str(pointer)))


def test_the_access_log_never_shows_a_user_id_when_a_user_key_is_configured():
    import logging

    from recsys_pretrain.serve import UserIdRedactor

    assert make_server(None, ServeConfig(user_key_env="RECSYS_USER_KEY")).config.access_log is False  # the default

    def line(path: str) -> str:
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:5000", "GET", path, "1.1", 200), None)
        assert UserIdRedactor().filter(record)
        return record.getMessage()

    assert line("/recommend/alice-7731?k=3") == '127.0.0.1:5000 - "GET /recommend/<user>?k=3 HTTP/1.1" 200'
    assert line("/recommend/caf%C3%A9") == '127.0.0.1:5000 - "GET /recommend/<user> HTTP/1.1" 200'
    assert line("/recommend") == '127.0.0.1:5000 - "GET /recommend HTTP/1.1" 200'  # the history route
    assert line("/similar/i3?k=2") == '127.0.0.1:5000 - "GET /similar/i3?k=2 HTTP/1.1" 200'


def _wait(cond, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_before_the_first_publication_it_is_live_not_ready_then_follows_the_pointer(served, tmp_path, monkeypatch):
    """No pointer file yet: the service starts, /health (liveness) 200 saying what it waits for, /ready and the
    recommendation routes 503; the first publication is served without a restart, the next one swapped in."""
    from recsys_pretrain.io import write_json

    model_dir = served["model_dir"]
    _index(model_dir, tmp_path / "v1", "HNSW16")
    _index(model_dir, tmp_path / "v2", "Flat")
    pointer = tmp_path / "serving" / "current.json"
    scfg = ServeConfig(index=str(pointer), reload_poll_s=0.1)
    holder = make_holder(scfg)
    assert not holder.ready and holder.version == 0 and str(pointer) in holder.waiting_for
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    token = "t" * 32
    app = create_app(holder, scfg)
    try:
        with running(app, scfg) as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            h = c.get("/health")
            assert h.status_code == 200
            h = h.json()
            assert h["status"] == "waiting" and h["ready"] is False and h["model"] is None
            assert str(pointer) in h["waiting_for"] and "first publication" in h["waiting_for"]
            r = c.get("/ready")
            assert r.status_code == 503 and r.json()["ready"] is False and r.headers["retry-after"] == "1"
            for r in (c.get("/recommend/1"), c.post("/recommend", json={"history": [1]}), c.get("/similar/1"),
                      c.get("/metadata"), c.post("/admin/reload")):
                assert r.status_code == 503, r.text
                assert r.json()["error"].startswith("not ready: ") and "first publication" in r.json()["error"]
            # the first publication: served at the next poll, by the same server
            write_json(pointer, {"model": str(model_dir), "version": 1, "path": str(tmp_path / "v1")})
            _wait(lambda: c.get("/ready").status_code == 200, "the first publication was not loaded")
            h = c.get("/health").json()
            assert h["status"] == "ok" and h["ready"] and h["waiting_for"] is None and h["index"] == "HNSW16"
            assert h["model"]["version"] == 1 and h["model"]["name"] == "mf" and h["index_version"] == 1
            assert c.get("/recommend/1").status_code == 200 and c.get("/metadata").status_code == 200
            started = h["started_at"]
            # the next one is swapped in
            write_json(pointer, {"model": str(model_dir), "version": 2, "path": str(tmp_path / "v2")})
            _wait(lambda: c.get("/health").json()["model"]["version"] == 2, "the next publication was not followed")
            h = c.get("/health").json()
            assert h["index"] == "Flat" and h["index_version"] == 2 and h["started_at"] == started
        # a client without the admin token does not see the pointer's path
        other = make_holder(ServeConfig(index=str(tmp_path / "elsewhere" / "current.json"), reload_poll_s=0))
        try:
            with running(create_app(other, ServeConfig(admin_token=token)), scfg) as (_, url), \
                    httpx.Client(base_url=url, timeout=10) as c:
                h = c.get("/health").json()
                assert h["ready"] is False and str(tmp_path) not in h["waiting_for"] and "<redacted>" in h["waiting_for"]
                assert str(tmp_path) not in c.get("/ready").text
        finally:
            other.close()
    finally:
        holder.close()


def test_a_failed_load_is_retried_after_a_backoff_and_the_old_one_keeps_serving(served, tmp_path):
    from recsys_pretrain.io import write_json

    model_dir = served["model_dir"]
    _index(model_dir, tmp_path / "v1", "Flat")
    pointer = tmp_path / "current.json"
    write_json(pointer, {"model": str(model_dir), "path": str(tmp_path / "v1")})
    holder = make_holder(ServeConfig(index=str(pointer), reload_poll_s=0))  # polled by hand here
    calls = []
    real = holder._loader

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the model store hung up")
        return real()

    holder._loader = flaky
    try:
        write_json(pointer, {"model": str(model_dir), "path": str(tmp_path / "v1"), "version": 2})
        assert holder.poll(0.01) is False and holder.ready and holder.version == 1
        assert holder.last_error.startswith("OSError")
        assert holder.poll(0.01) is False and len(calls) == 1  # the same publication: not before the backoff
        holder._retry_at = 0.0  # the backoff has passed
        assert holder.poll(0.01) is True and holder.version == 2 and holder.last_error is None
        assert holder.poll(0.01) is False and len(calls) == 2  # nothing new
    finally:
        holder.close()


def test_an_alias_is_waited_for_and_re_resolved_on_the_poll(served, mlflow_uri):
    from recsys_pretrain.registry import register_model, set_alias
    from recsys_pretrain.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_uri)
    runs = []
    for _ in range(2):
        with tracker.start_run("serving-alias-test", "mf") as run_id:
            tracker.log_model_dir(served["model_dir"], name="model_dir")
        runs.append(run_id)
    v1 = register_model(f"runs:/{runs[0]}/model_dir", "alias-mf", mlflow_uri)
    holder = make_holder(ServeConfig(model="models:/alias-mf@champion", reload_poll_s=0.1), mlflow_uri)
    try:
        assert not holder.ready and "alias 'champion'" in holder.waiting_for
        set_alias("alias-mf", "champion", v1, mlflow_uri)
        _wait(lambda: holder.ready, "the alias was not picked up")
        assert holder.current.source["registered"] == {"model": "models:/alias-mf@champion", "version": v1}
        v2 = register_model(f"runs:/{runs[1]}/model_dir", "alias-mf", mlflow_uri)
        set_alias("alias-mf", "champion", v2, mlflow_uri)
        _wait(lambda: holder.current.source["registered"]["version"] == v2, "the moved alias was not followed")
        assert holder.version == 2
    finally:
        holder.close()
