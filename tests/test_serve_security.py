"""The service against hostile or careless clients, on a real uvicorn server (127.0.0.1, a free port): the
admin token, bodies over the limit however they are sent, errors that quote no input, slow clients, the
download cache across reloads, and which re-rankers may be loaded."""

import gc
import json
import select
import shutil
import socket
import tempfile
import time

import httpx
import pytest

from recsys_pretrain.config import ServeConfig
from recsys_pretrain.serve import (
    ADMIN_TOKEN_ENV,
    AdminGuard,
    create_app,
    is_loopback,
    make_holder,
    make_server,
    trusted_reranker,
)
from tests.test_serve import _index, running, tiny_mf

TOKEN = "t0k3n-" + "x" * 26


@pytest.fixture(scope="module")
def model(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-sec")
    model_dir = tiny_mf(tiny_prepared["prepared"], root)
    _index(model_dir, root / "index", "Flat")
    return {"model_dir": model_dir, "index": root / "index", "root": root}


@pytest.fixture
def no_env_token(monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)


def _cfg(model, **kw):
    return ServeConfig(model=str(model["model_dir"]), index=str(model["index"]), max_history=50,
                       max_body_bytes=4_000, **kw)


def _serve(cfg, tracking_uri=None):
    """(holder, running server) for cfg; the caller closes the holder."""
    holder = make_holder(cfg, tracking_uri)
    return holder, running(create_app(holder, cfg), cfg)


# ---- 10. the admin routes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False),
                                       ("10.0.0.5", False), ("example.org", False)])
def test_loopback_hosts(host, loop):
    assert is_loopback(host) is loop


def test_admin_reload_needs_the_token(model, no_env_token):
    cfg = _cfg(model, admin_token=TOKEN)
    holder, server = _serve(cfg)
    try:
        with server as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            r = c.post("/admin/reload")
            assert r.status_code == 401 and r.json()["error"].startswith("authorization: ")
            assert r.headers["www-authenticate"].startswith("Bearer")
            for bad in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN,
                        f"Bearer {TOKEN[:-1]}é".encode()):  # a non-ASCII token is refused, not a 500
                r = c.post("/admin/reload", headers={"Authorization": bad})
                assert r.status_code == 401 and r.headers["content-type"] == "application/json", bad
            assert holder.version == 1  # nothing was reloaded
            r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.json()["version"] == 2

            # paths: admins only
            root = str(model["root"])
            public = c.get("/metadata")
            assert public.status_code == 200 and root not in public.text
            assert public.json()["source"]["model_dir"] == "<redacted>"
            assert public.json()["index"]["recall"] is not None  # the rest is all there
            admin = c.get("/metadata", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            assert admin["source"]["model_dir"] == str(model["model_dir"])

            # a failed reload names the broken file to the admin, not to everyone
            meta = model["index"] / "index.json"
            good = meta.read_text()
            meta.write_text(json.dumps({**json.loads(good), "n_items": 1}))
            try:
                r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            finally:
                meta.write_text(good)
            assert r.status_code == 500 and "still serving version 2" in r.json()["error"]
            health = c.get("/health")
            assert health.json()["last_reload_error"] and root not in health.text
            admin_health = c.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            assert admin_health["last_reload_error"] == holder.last_error
    finally:
        holder.close()


def test_admin_routes_are_off_without_a_token_off_loopback(model, no_env_token, monkeypatch):
    cfg = _cfg(model, host="0.0.0.0")  # the policy reads the configured bind; the test socket is loopback
    holder, server = _serve(cfg)
    try:
        with server as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            r = c.post("/admin/reload", headers={"Authorization": "Bearer anything-at-all-here"})
            assert r.status_code == 403 and "admin_token" in r.json()["error"] and holder.version == 1
            assert str(model["root"]) not in c.get("/metadata").text
            assert c.get("/recommend/1").status_code == 200  # the rest serves as usual
    finally:
        holder.close()
    # the token from the environment turns them on
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    holder, server = _serve(cfg)
    try:
        with server as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            assert c.post("/admin/reload").status_code == 401
            assert c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    finally:
        holder.close()
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "short")
    with pytest.raises(ValueError, match="at least 16 characters"):
        make_holder(cfg)


@pytest.mark.parametrize("proxied", [{"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "127.0.0.1"},
                                     {"Forwarded": "for=203.0.113.9"}, {"X-Real-IP": "203.0.113.9"}])
def test_without_a_token_admin_needs_a_direct_loopback_client(model, no_env_token, proxied):
    """A reverse proxy on the same host connects from loopback on behalf of anyone: its requests are refused."""
    cfg = _cfg(model)  # loopback bind, no token
    holder, server = _serve(cfg)
    try:
        with server as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            r = c.post("/admin/reload", headers=proxied)
            assert r.status_code == 403 and "proxy" in r.json()["error"] and holder.version == 1
            assert str(model["root"]) not in c.get("/metadata", headers=proxied).text  # no admin views either
            assert c.post("/admin/reload").status_code == 200 and holder.version == 2  # direct: allowed
            assert c.get("/metadata").json()["source"]["model_dir"] == str(model["model_dir"])
    finally:
        holder.close()


def test_admin_guard_reads_the_client_address_not_only_the_bind():
    from starlette.requests import Request

    def request(client, headers=()):
        return Request({"type": "http", "method": "POST", "path": "/admin/reload", "headers": list(headers),
                        "client": client})

    guard = AdminGuard(None, "127.0.0.1")
    assert guard.allows(request(("127.0.0.1", 5000))) and guard.allows(request(("::1", 5000)))
    assert not guard.allows(request(("10.0.0.7", 5000)))  # e.g. a proxy on another host that adds no header
    assert not guard.allows(request(None))
    assert not guard.allows(request(("127.0.0.1", 5000), [(b"forwarded", b"for=198.51.100.1")]))
    assert not AdminGuard(None, "0.0.0.0").allows(request(("127.0.0.1", 5000)))


def test_a_user_key_for_a_model_without_pseudonymised_ids_is_refused(model, monkeypatch):
    monkeypatch.setenv("RECSYS_TEST_SERVE_KEY", "k" * 32)
    with pytest.raises(ValueError, match="not pseudonymised"):
        make_holder(_cfg(model, user_key_env="RECSYS_TEST_SERVE_KEY"))
    with pytest.raises(ValueError, match="user_id_type"):
        make_holder(_cfg(model, user_id_type="integer"))


# ---- 11. requests ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(model):
    cfg = _cfg(model)
    holder = make_holder(cfg)
    try:
        with running(create_app(holder, cfg), cfg) as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            yield c
    finally:
        holder.close()


def test_chunked_body_over_the_limit_is_413(client):
    body = json.dumps({"history": ["x" * 1000] * 8}).encode()  # ~8 kB: 8 ids (under max_history), 2x the limit

    def chunks():
        for i in range(0, len(body), 500):
            yield body[i : i + 500]

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"].startswith("body: ")
    small = json.dumps({"history": [1, 2], "k": 3}).encode()
    r = client.post("/recommend", content=iter([small[:5], small[5:]]), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["k"] == 3  # a chunked body under the limit is read as usual


@pytest.mark.parametrize("payload,field", [
    ({"history": [{"id": "y" * 3500}]}, "history[0]"),
    ({"history": ["a"] * 60}, "history"),  # over max_history: the list itself is the input
    ({"history": [1], "z" * 3000: 1}, "zzzz"),  # an extra key: named, cut short
    ("y" * 3900, "body"),
])
def test_422_names_the_field_and_quotes_an_excerpt(client, payload, field):
    r = client.post("/recommend", json=payload)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert field in r.json()["error"]
    assert len(r.content) < 1_000  # the input was ~3.5 kB: only an excerpt came back
    assert all(len(d.get("input", "")) <= 110 for d in r.json()["detail"])


@pytest.mark.parametrize("payload,field", [
    (b'{"history": [NaN]}', "history[0]"),
    (b'{"history": [Infinity, 1]}', "history[0]"),
    (b'{"history": [1], "k": 1e400}', "k"),
    (b'{"history": [1], "k": NaN}', "k"),
    (b'{"history": [1e400]}', "history[0]"),
])
def test_nan_and_overflowing_numbers_are_4xx_json(client, payload, field):
    r = client.post("/recommend", content=payload, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/json", r.text
    assert field in r.json()["error"]


@pytest.mark.parametrize("payload,field", [
    ({"history": [1], "k": True}, "k"),
    ({"history": [True]}, "history[0]"),
    ({"history": [1, False]}, "history[1]"),
])
def test_booleans_are_refused(client, payload, field):
    r = client.post("/recommend", json=payload)
    assert r.status_code == 422 and r.json()["error"].startswith(field), r.text


def test_server_limits_come_from_the_config(model):
    cfg = ServeConfig(keep_alive_s=2.5, max_header_bytes=8_192, limit_concurrency=64, header_timeout_s=3)
    config = make_server(None, cfg).config
    assert config.timeout_keep_alive == 2.5 and config.h11_max_incomplete_event_size == 8_192
    assert config.limit_concurrency == 64 and config.http.header_timeout_s == 3
    assert make_server(None, ServeConfig(limit_concurrency=0)).config.limit_concurrency is None


def test_oversized_headers_are_refused(client):
    r = client.get("/health", headers={"x-big": "a" * 20_000})  # over serve.max_header_bytes (16 kB)
    assert r.status_code == 431 and r.json()["error"].startswith("headers: ")
    assert client.get("/health", headers={"x-big": "a" * 8_000}).status_code == 200


def _closed(sock) -> tuple[bool, bytes]:
    """(closed by the server, what it sent): a non-blocking read."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False, b""
    except OSError:  # reset
        return True, b""
    return data == b"" or b"connection: close" in data.lower(), data


def test_slow_clients_are_closed_while_others_are_served(model):
    """50 connections sending their headers a byte every 0.2 s, 5 sending a body as slowly, 5 sending
    nothing: each is closed by its deadline, and a normal request meanwhile gets its answer."""
    cfg = _cfg(model, header_timeout_s=1.0, body_timeout_s=1.0)
    holder = make_holder(cfg)
    try:
        with running(create_app(holder, cfg), cfg) as (_, url):
            host, port = url.removeprefix("http://").split(":")
            socks, kind = [], {}
            for i in range(60):
                s = socket.create_connection((host, int(port)), timeout=5)
                if i < 50:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    kind[s] = "headers"
                elif i < 55:
                    s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                              b"content-length: 200\r\n\r\n{")
                    kind[s] = "body"
                else:
                    kind[s] = "silent"
                s.setblocking(False)
                socks.append(s)
            start = time.monotonic()
            closed_at, got = {}, {}
            with httpx.Client(base_url=url, timeout=10) as c:
                while len(closed_at) < len(socks) and time.monotonic() - start < 10:
                    for s in socks:
                        if s in closed_at:
                            continue
                        done, data = _closed(s)
                        got[s] = got.get(s, b"") + data
                        if done:
                            closed_at[s] = time.monotonic() - start
                        elif kind[s] != "silent":
                            try:
                                s.send(b"a")  # one more byte: it never completes the request
                            except OSError:
                                closed_at[s] = time.monotonic() - start
                    assert c.get("/health").status_code == 200  # served throughout
                    select.select([], [], [], 0.2)
            assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} slow connections still open"
            assert max(closed_at.values()) < 1.0 + 4.0  # the deadline, plus slack for two busy shared cores
            # (a byte sent just as the server closes can reset the socket before its 408 is read)
            assert sum(b" 408 " in got[s] for s in socks if kind[s] == "headers") >= 45
            for s in socks:
                s.close()
    finally:
        holder.close()


def test_keep_alive_connections_still_work(client):
    # one connection, several requests: the header deadline is per request, not per connection
    for _ in range(3):
        assert client.get("/health").status_code == 200
        time.sleep(0.1)


# ---- 10. the download cache ------------------------------------------------------------------------------
def test_reloads_of_a_registered_model_reuse_one_download(model, mlflow_uri, tmp_path, monkeypatch, no_env_token):
    from recsys_pretrain.registry import register_model, set_alias
    from recsys_pretrain.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_uri)
    with tracker.start_run("serving-test", "mf") as run_id:
        tracker.log_model_dir(model["model_dir"], name="model_dir")
    set_alias("tiny-mf", "champion", register_model(f"runs:/{run_id}/model_dir", "tiny-mf", mlflow_uri), mlflow_uri)

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # every temp directory of this process lands here
    cfg = ServeConfig(model="models:/tiny-mf@champion", index=str(model["index"]), admin_token=TOKEN)
    holder = make_holder(cfg, mlflow_uri)
    try:
        with running(create_app(holder, cfg), cfg) as (_, url), httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(20):
                r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.status_code == 200, r.text
            assert holder.version == 21 and c.get("/recommend/1").status_code == 200
        dirs = [p for p in tmp.iterdir() if p.is_dir()]
        assert len(dirs) == 1, dirs  # the holder's cache ...
        assert [p.name for p in dirs[0].iterdir()] == [run_id]  # ... holding the one run's download
    finally:
        holder.close()
    assert not [p for p in tmp.iterdir() if p.is_dir()]  # removed with the holder


def _log_model_dir_run(model, mlflow_uri) -> str:
    from recsys_pretrain.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_uri)
    with tracker.start_run("serving-test", "mf") as run_id:
        tracker.log_model_dir(model["model_dir"], name="model_dir")
    return run_id


def test_a_cut_off_download_never_poisons_the_cache(model, mlflow_uri, tmp_path, monkeypatch):
    import recsys_pretrain.registry as registry
    from recsys_pretrain.registry import resolve_model_dir

    run_id = _log_model_dir_run(model, mlflow_uri)
    cache = tmp_path / "cache"
    real = registry.download_artifacts

    def cut_off(run_id, artifact_path, tracking_uri, dst_path=None):
        local = real(run_id, artifact_path, tracking_uri, dst_path=dst_path)
        (local / "item_embeddings.npy").unlink()  # killed half way: model.json is there, the vectors are not
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(registry, "download_artifacts", cut_off)
    with pytest.raises(ConnectionResetError):
        resolve_model_dir(run_id, mlflow_uri, cache_dir=cache)
    assert not (cache / run_id).exists()  # nothing that looks cached
    monkeypatch.setattr(registry, "download_artifacts", real)
    got = resolve_model_dir(run_id, mlflow_uri, cache_dir=cache)
    assert got == cache / run_id / "model_dir" and (got / "item_embeddings.npy").exists()
    assert [p.name for p in cache.iterdir()] == [run_id]  # the cut-off download left nothing behind

    # an entry downloaded in place by an older version, cut off after model.json: fetched again
    shutil.rmtree(cache / run_id)
    (cache / run_id / "model_dir").mkdir(parents=True)
    shutil.copy(model["model_dir"] / "model.json", cache / run_id / "model_dir")
    got = resolve_model_dir(run_id, mlflow_uri, cache_dir=cache)
    assert (got / "item_embeddings.npy").exists() and [p.name for p in cache.iterdir()] == [run_id]

    def boom(*a, **kw):
        raise AssertionError("a complete cache entry was downloaded again")

    monkeypatch.setattr(registry, "download_artifacts", boom)
    assert resolve_model_dir(run_id, mlflow_uri, cache_dir=cache) == got


def test_reranker_loads_go_to_the_cache_and_leave_no_temp_dirs(model, mlflow_uri, tmp_path, monkeypatch):
    from recsys_pretrain.pyfunc import log_recommender
    from recsys_pretrain.registry import register_model, set_alias
    from recsys_pretrain.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_uri)
    with tracker.start_run("serving-test", "ranker"):
        uri = log_recommender(tracker, model["model_dir"])  # a real pyfunc scoring (user_id, item_id) pairs
    versions = [register_model(uri, "recsys-ranker", mlflow_uri) for _ in range(3)]
    set_alias("recsys-ranker", "champion", versions[0], mlflow_uri)

    # A local store hands out its own files; a remote one (the compose stack's MLflow server) is downloaded
    # from, into a new temp directory unless told where: make this store behave like that (local copies,
    # under tmp, are still read in place).
    from pathlib import Path

    from mlflow.store.artifact.artifact_repo import ArtifactRepository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    local = LocalArtifactRepository.download_artifacts

    def remote_like(self, artifact_path, dst_path=None):
        if Path(self.artifact_dir).resolve().is_relative_to(tmp.resolve()):
            return local(self, artifact_path, dst_path)
        return ArtifactRepository.download_artifacts(self, artifact_path, dst_path)

    monkeypatch.setattr(LocalArtifactRepository, "download_artifacts", remote_like)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # every temp directory of this process lands here
    holder = make_holder(_cfg(model, reranker="models:/recsys-ranker@champion"), mlflow_uri)
    try:
        for v in [*versions[1:], versions[0]]:  # each reload loads a re-ranker: 4 loads in all
            set_alias("recsys-ranker", "champion", v, mlflow_uri)
            holder.reload()
        user = holder.current.vocab.user_ids([3])[0]
        assert holder.current.recommend([user], 5)[0].reranked
        gc.collect()
        dirs = list(tmp.iterdir())
        assert len(dirs) == 1, dirs  # the holder's cache, nothing else
        assert [p.name for p in dirs[0].iterdir()] == ["rerankers"]  # (the model is a local directory)
        served = list((dirs[0] / "rerankers").iterdir())
        assert len(served) == 1 and served[0].name.startswith(f"recsys-ranker-v{versions[0]}-"), served
    finally:
        holder.close()
    gc.collect()
    assert not list(tmp.iterdir())


# ---- 12. which re-rankers may be loaded ----------------------------------------------------------------------
@pytest.mark.parametrize("uri,ok", [
    ("models:/recsys-ranker@champion", ("recsys-ranker", "champion", None)),
    ("models:/recsys-ranker/3", ("recsys-ranker", None, "3")),
    ("models:/recsys-ranker", None),
    ("models:/recsys-ranker/latest", None),
    ("models:/attacker@champion", None),
    ("models:/recsys-ranker-2@champion", None),
    ("models:/m-0123456789abcdef0123456789abcdef", None),  # an MLflow 3 logged-model id
    ("runs:/0123456789abcdef0123456789abcdef/model", None),
    ("0123456789abcdef0123456789abcdef", None),
    ("/tmp/ranker", None),
    ("file:///tmp/ranker", None),
])
def test_rerankers_come_from_trusted_names_only(uri, ok):
    if ok is None:
        with pytest.raises(ValueError, match="trusted_reranker_names"):
            trusted_reranker(uri, ("recsys-ranker",))
    else:
        assert trusted_reranker(uri, ("recsys-ranker",)) == ok
        with pytest.raises(ValueError, match="none"):
            trusted_reranker(uri, ())


def test_untrusted_reranker_is_refused_before_anything_loads(model, monkeypatch):
    import recsys_pretrain.registry as registry

    def boom(*a, **kw):
        raise AssertionError("an untrusted re-ranker was loaded")

    monkeypatch.setattr(registry, "load_pyfunc", boom)
    monkeypatch.setattr(registry, "get_alias_version", boom)
    for uri in ("models:/attacker@champion", "runs:/0123456789abcdef0123456789abcdef/model"):
        with pytest.raises(ValueError, match="is refused"):
            make_holder(_cfg(model, reranker=uri), "sqlite:///unused.db")


def test_reranker_is_pinned_to_its_version_and_loaded_once_per_version(model, mlflow_uri, monkeypatch):
    import numpy as np

    import recsys_pretrain.registry as registry
    from recsys_pretrain.registry import register_model, set_alias
    from recsys_pretrain.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_uri)
    with tracker.start_run("serving-test", "ranker") as run_id:
        tracker.log_model_dir(model["model_dir"], name="model_dir")
    v1 = register_model(f"runs:/{run_id}/model_dir", "recsys-ranker", mlflow_uri)
    v2 = register_model(f"runs:/{run_id}/model_dir", "recsys-ranker", mlflow_uri)
    set_alias("recsys-ranker", "champion", v1, mlflow_uri)

    loaded = []

    class Scorer:  # stands in for the pyfunc: scores every candidate pair
        def predict(self, frame):
            return np.arange(len(frame), dtype=np.float64)

    def fake_load(uri, tracking_uri, dst_path=None):
        loaded.append(uri)
        return Scorer()

    monkeypatch.setattr(registry, "load_pyfunc", fake_load)
    holder = make_holder(_cfg(model, reranker="models:/recsys-ranker@champion"), mlflow_uri)
    try:
        for _ in range(5):
            holder.reload()
        assert loaded == [f"models:/recsys-ranker/{v1}"]  # once, by version, not by the movable alias
        user = holder.current.vocab.user_ids([3])[0]
        assert holder.current.recommend([user], 5)[0].reranked
        set_alias("recsys-ranker", "champion", v2, mlflow_uri)
        holder.reload()
        assert loaded == [f"models:/recsys-ranker/{v1}", f"models:/recsys-ranker/{v2}"]
    finally:
        holder.close()
