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
