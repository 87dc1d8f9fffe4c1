"""Serving benchmark: the served answers are the model's, and the HTTP service's throughput on 2 cores.

1. ML-1M (6,040 users, 3,416 items), MF trained by this project, a saved exact (Flat) index:
   - the served top-10 of every user (Recommender.recommend: index search, over-fetch, seen-item filter,
     raw ids) against the model's exact top-10 (its own scores, history masked, torch.topk);
   - HR@10 through the service path (the same call, with each user's train + validation items as the
     seen items, the test item held out) against the offline evaluation (`evaluate(..., "test")`);
   - HTTP answers for a sample of users equal the Python API's.
2. HTTP load: the service (uvicorn, one process, `recsys-pretrain serve`) on 127.0.0.1, driven by an
   open-loop async client at fixed request rates (latency counted from each request's scheduled time, so
   a slow server cannot hide queueing); 80% GET /recommend/{user}, 10% POST /recommend with a 20-item
   history, 10% GET /similar/{item}. Client and server share the 2 cores.

    python benchmarks/serve.py            # ML-1M and the load test (a few minutes)
    python benchmarks/serve.py --quick    # a small synthetic log and 2-second load steps: a smoke test

Results: benchmarks/results/serve.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, DATASETS, ROOT, write_results  # noqa: E402

SOURCE = DATASETS / "ml-1m" / "ml-1m_sasrec_style.txt"


# ---- data and model -------------------------------------------------------------------------------------
def prepared_data(quick: bool) -> Path:
    from recsys_pretrain.config import IngestConfig, PrepareConfig
    from recsys_pretrain.data.ingest import ingest
    from recsys_pretrain.data.prepare import prepare

    work = CACHE / "serve" / ("synth" if quick else "ml-1m")
    if (work / "prepared" / "loo.parquet").exists():
        return work
    if quick:
        from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic

        raw = work / "events.csv"
        write_synthetic(SynthConfig(n_users=400, n_items=300, n_categories=8, events_per_user=30, seed=3), raw)
        ingest([raw], work / "ingested", IngestConfig(id_type="int"))
    else:
        if not SOURCE.exists():
            raise SystemExit(f"{SOURCE} not found (the public datasets live in ../shared/datasets)")
        ingest([SOURCE], work / "ingested", IngestConfig(format="sasrec"))
    prepare(work / "ingested", work / "prepared", PrepareConfig())
    return work


def trained_model(work: Path, quick: bool) -> Path:
    from recsys_pretrain.config import load_config
    from recsys_pretrain.train.pretrain import pretrain

    model_dir = work / "run-mf" / "model"
    if (model_dir / "model.json").exists():
        return model_dir
    over = ["pretrain.model=mf", "pretrain.mf.train.progress=false"]
    if quick:
        over += ["pretrain.mf.dim=16", "pretrain.mf.train.epochs=4"]
    return pretrain(work / "prepared", load_config(None, over).pretrain, work / "run-mf").model_dir


# ---- 1. exactness and HR@10 through the service path -------------------------------------------------------
def exactness(work: Path, model_dir: Path, index_dir: Path) -> dict:
    import scipy.sparse as sp
    import torch

    from recsys_pretrain.checkpoint import load_model_dir
    from recsys_pretrain.data.prepared import history_matrix, load_prepared
    from recsys_pretrain.evaluation import evaluate
    from recsys_pretrain.index import load_index
    from recsys_pretrain.recommend import Recommender

    data = load_prepared(work / "prepared")
    model, meta, vocab = load_model_dir(model_dir)
    index = load_index(index_dir)
    test_hist = history_matrix(data.histories("test"), data.n_items)  # train + validation items
    # The offline protocol never excludes the target itself, even when the user saw it before (a repeat);
    # the same exclusion here makes the two HR@10 comparable on logs with repeats.
    has = data.test >= 0
    target = sp.csr_matrix((np.ones(int(has.sum()), np.float32), (np.flatnonzero(has), data.test[has])),
                           shape=test_hist.shape)
    repeats = float(test_hist.multiply(target).sum() / max(1, has.sum()))
    test_hist = (test_hist - test_hist.multiply(target)).tocsr()
    test_hist.eliminate_zeros()
    rec = Recommender(model, meta, vocab, index, np.load(model_dir / "user_embeddings.npy"), test_hist,
                      np.load(model_dir / "popularity.npy"))
    users = np.arange(data.n_users)
    t0 = time.perf_counter()
    served = []
    for lo in range(0, len(users), 512):
        served += rec.recommend(vocab.user_ids(users[lo : lo + 512]), k=10)
    serve_s = time.perf_counter() - t0

    same_list = same_set = 0
    with torch.no_grad():
        for lo in range(0, len(users), 512):
            u = users[lo : lo + 512]
            s = model.score_users(torch.from_numpy(u)).clone()  # (b, n_items) the model's own scores
            rows = sp.csr_matrix(test_hist[u])
            r, c = rows.nonzero()
            s[torch.from_numpy(r), torch.from_numpy(c - 1)] = -float("inf")
            top = torch.topk(s, 10).indices.numpy() + 1  # (b, 10)
            for j, t in enumerate(top):
                ids = vocab.item_ids(t)
                same_list += served[lo + j].ids == ids
                same_set += set(served[lo + j].ids) == set(ids)
    targets = data.test
    has = targets >= 0
    hits = [vocab.item_ids([targets[u]])[0] in served[u].ids for u in users[has]]
    offline = evaluate(model, data, "test")
    return {"users": int(len(users)), "same_top10_list": same_list / len(users),
            "same_top10_set": same_set / len(users), "service_hr_at_10": float(np.mean(hits)),
            "offline_hr_at_10": offline["hr_at_10"], "offline_ndcg_at_10": offline["ndcg_at_10"],
            "users_with_test": int(has.sum()), "test_item_seen_before": repeats,
            "serve_seconds_all_users": serve_s}


# ---- 2. the HTTP service -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys_pretrain.cli", "serve", "--model", str(model_dir), "--index",
           str(index_dir), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become healthy in 120 s")


def http_matches_api(base: str, model_dir: Path, index_dir: Path, n: int) -> dict:
    import httpx

    from recsys_pretrain.recommend import Recommender

    rec = Recommender.load(model_dir, index_dir)
    rng = np.random.default_rng(0)
    users = rec.vocab.user_ids(rng.choice(rec.vocab.n_users, min(n, rec.vocab.n_users), replace=False))
    same = 0
    with httpx.Client(base_url=base, timeout=10) as c:
        for u, a in zip(users, rec.recommend(users, k=10), strict=True):
            got = [i["item_id"] for i in c.get(f"/recommend/{u}", params={"k": 10}).json()["items"]]
            same += got == a.ids
    return {"sampled_users": len(users), "http_equals_api": same / len(users)}


async def load_step(base: str, rate: float, seconds: float, users: list, items: list, seed: int,
                    grace: float = 10.0) -> dict:
    """Open loop: request i is sent at t0 + i / rate whatever happened before; latency from that time."""
    import httpx

    rnd = random.Random(seed)
    n = int(rate * seconds)
    lat = np.full(n, np.nan)
    errors: list[str] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base, timeout=grace, limits=limits) as client:
        t0 = time.perf_counter() + 0.2

        async def one(i: int) -> None:
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            x = rnd.random()
            try:
                if x < 0.8:
                    r = await client.get(f"/recommend/{rnd.choice(users)}", params={"k": 10})
                elif x < 0.9:
                    r = await client.post("/recommend", json={"history": rnd.sample(items, 20), "k": 10})
                else:
                    r = await client.get(f"/similar/{rnd.choice(items)}", params={"k": 10})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                return
            lat[i] = time.perf_counter() - due

        # Bounded: whatever has not finished `grace` seconds after the last send counts as an error, so a
        # saturated server ends the step instead of queueing it for minutes.
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + grace)
        for t in pending:
            t.cancel()
        errors.extend(["unfinished at the step's deadline"] * len(pending))
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    done = lat[~np.isnan(lat)]
    return {"rate": rate, "requests": n, "seconds": wall, "throughput": len(done) / wall,
            "p50_ms": float(np.percentile(done, 50) * 1e3) if len(done) else float("nan"),
            "p99_ms": float(np.percentile(done, 99) * 1e3) if len(done) else float("nan"),
            "errors": len(errors), "error_sample": errors[:3]}


# ---- report ----------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    e, h = res["exactness"], res["http_check"]
    lines = ["# Serving: the model's answers, and the HTTP service on 2 cores", ""]
    if res["quick"]:
        lines += ["**A `--quick` smoke run on a small synthetic log: not the benchmark's result; run without "
                  "`--quick`.**", ""]
    lines += [
        f"Data: {res['dataset']}; model: MF ({res['model_dim']} d) trained by this project; index: the saved "
        f"exact `Flat` index (`recsys-pretrain index --factory Flat`).",
        "",
        "## The served answers are the model's",
        "",
        "| check | value |",
        "|---|---:|",
        f"| users | {e['users']:,} |",
        f"| served top-10 identical to the model's exact top-10 (same order) | {e['same_top10_list']:.4f} |",
        f"| ... same items | {e['same_top10_set']:.4f} |",
        f"| HR@10 through the service path | {e['service_hr_at_10']:.4f} |",
        f"| HR@10 of the offline evaluation | {e['offline_hr_at_10']:.4f} |",
        f"| HTTP answers equal to the Python API's ({h['sampled_users']} users) | {h['http_equals_api']:.4f} |",
        f"| all users served through the Python API in | {e['serve_seconds_all_users']:.2f} s |",
        "",
        "The service path excludes each user's train + validation items, as the offline protocol does, and "
        "like it never the test item itself (it was seen before for "
        f"{e['test_item_seen_before']:.1%} of users: repeats). Any order difference is a tie in float32 "
        "scores (FAISS and PyTorch sum the dot products in different orders).",
        "",
        "## HTTP load (open loop, 80% GET /recommend, 10% POST /recommend, 10% GET /similar, k = 10)",
        "",
        "| offered req/s | achieved req/s | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in res["load"]:
        lines.append(f"| {s['rate']:.0f} | {s['throughput']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                     f"{s['errors']} |")
    held = res["holds"]
    lines += ["", f"Holds {held['rate']:.0f} req/s (the highest offered rate served with 0 errors, at least "
                  f"{res['keep_share']:.0%} of it achieved, p99 <= {res['slo_ms']:.0f} ms)." if held else
              "No offered rate met the bar (0 errors, rate achieved, p99 within the SLO).",
              "", "Client and server share the machine's 2 cores: the client's own CPU use lowers what the "
              "server can reach, so these are lower bounds for a server on its own cores. One uvicorn worker; "
              "FAISS on one thread per request."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rates", help="comma-separated request rates (req/s)")
    p.add_argument("--seconds", type=float, help="duration of each load step")
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 a rate must keep to count as held")
    p.add_argument("--http-check-users", type=int)
    args = p.parse_args()
    quick = args.quick
    rates = [float(r) for r in (args.rates or ("25,50" if quick else "50,100,125,150,175,200,300")).split(",")]
    seconds = args.seconds or (2.0 if quick else 20.0)
    keep_share = 0.98

    from recsys_pretrain.config import IndexConfig
    from recsys_pretrain.index import build_model_index

    work = prepared_data(quick)
    model_dir = trained_model(work, quick)
    index_dir = work / "index-flat"
    build_model_index(model_dir, index_dir, IndexConfig(factory="Flat", tune_queries=200, tune_latency_queries=50))
    print("1. exactness", flush=True)
    exact = exactness(work, model_dir, index_dir)
    print(f"   {exact}", flush=True)

    print("2. HTTP", flush=True)
    port = free_port()
    log = work / "server.log"
    proc = start_server(model_dir, index_dir, port, log)
    base = f"http://127.0.0.1:{port}"
    steps = []
    try:
        check = http_matches_api(base, model_dir, index_dir, args.http_check_users or (50 if quick else 500))
        print(f"   {check}", flush=True)
        from recsys_pretrain.vocab import Vocab

        vocab = Vocab.load(model_dir / "vocab.json")
        users, items = [str(u) for u in vocab.users.to_list()], vocab.items.to_list()
        for i, rate in enumerate(rates):
            step = asyncio.run(load_step(base, rate, seconds, users, items, seed=i))
            steps.append(step)
            print(f"   {rate:.0f} req/s: achieved {step['throughput']:.0f}, p50 {step['p50_ms']:.1f} ms, "
                  f"p99 {step['p99_ms']:.1f} ms, errors {step['errors']}", flush=True)
            if step["errors"] or step["throughput"] < 0.8 * rate:
                break  # past saturation: the next rates only queue up
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [s for s in steps if not s["errors"] and s["throughput"] >= keep_share * s["rate"]
          and s["p99_ms"] <= args.slo_ms]
    meta = json.loads((model_dir / "model.json").read_text())
    res = {"quick": quick, "dataset": "synthetic (400 users x 300 items)" if quick else "ML-1M (sasrec-style)",
           "model_dim": meta["config"]["dim"], "exactness": exact, "http_check": check, "load": steps,
           "holds": max(ok, key=lambda s: s["rate"]) if ok else None, "slo_ms": args.slo_ms,
           "keep_share": keep_share, "seconds_per_step": seconds}
    write_results("serve", res, markdown(res))
    print("wrote benchmarks/results/serve.{md,json}")


if __name__ == "__main__":
    main()
