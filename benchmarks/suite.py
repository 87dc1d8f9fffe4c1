"""The suite: every model on every public dataset under one protocol, with the targets checked per dataset.

Protocol (the library's evaluation, the same for all): leave-last-out as `prepare` makes it (validation =
each user's second-to-last item, test = the last), the whole catalogue ranked, the user's history
excluded, HR@10 and NDCG@10 over every user. Hyper-parameters are chosen on validation and reported on
test. With `--refit on` (the default) each peer is fit again with its chosen settings on training +
validation items before test (`test_ndcg_at_10`); the validation-only fit's test figure is kept beside it
(`test_ndcg_at_10_no_refit`). Ours (`mf`, `bert4rec`) run through `recsys_pretrain.train.pretrain.pretrain`
with the library's defaults, only bert4rec's wall-clock budget set (`--minutes`), and their test figure is
the library's own.

    python benchmarks/suite.py                                    # everything (hours on 2 cores)
    python benchmarks/suite.py --datasets ml-100k --minutes 0.5   # a smoke run
    python benchmarks/suite.py --datasets lastfm --models popularity,ease,als
    python benchmarks/suite.py --render                           # rewrite suite.md from suite.json

Datasets are read by path from ../shared/datasets (never copied); ingested and prepared data and model runs
live under benchmarks/.cache/suite/<dataset>/. Rows are appended to benchmarks/results/NAME.partial.json as
they finish, and a rerun skips the rows already done under the same settings (unless `--fresh`), so a
killed suite resumes. Results: benchmarks/results/NAME.{md,json}, one row per dataset and model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # noqa: E402
from _common import CACHE, DATASETS, RESULTS, write_results  # noqa: E402

from recsys_pretrain.config import IngestConfig, PrepareConfig, PretrainConfig, load_config  # noqa: E402
from recsys_pretrain.data.ingest import ingest  # noqa: E402
from recsys_pretrain.data.prepare import prepare  # noqa: E402
from recsys_pretrain.data.prepared import load_prepared  # noqa: E402
from recsys_pretrain.train.pretrain import pretrain  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Dataset:
    path: str  # under ../shared/datasets
    format: str
    ingest: dict = dataclasses.field(default_factory=dict)  # IngestConfig overrides beyond the format
    note: str = ""


# One preparation for every dataset: each user's first interaction with an item only, so that every held-out
# target is an item the user has not seen (serving excludes seen items). Logs of ratings and reviews have no
# repeats, so this changes nothing there; in the Taobao log 66% of the last items were repeat views.
PROTOCOL = PrepareConfig(first_only=True)

SUITE: dict[str, Dataset] = {
    "ml-1m": Dataset("ml-1m/ml-1m_sasrec_style.txt", "sasrec"),
    "ml-100k": Dataset("ml-100k/u.data", "movielens"),
    "amazon-sports": Dataset("amazon-sports/Sports_and_Outdoors_pairs.txt", "sasrec"),
    "amazon-toys": Dataset("amazon-toys/Toys_and_Games_pairs.txt", "sasrec"),
    "lastfm": Dataset("lastfm/LastFM_pairs.txt", "sasrec"),
    "taobao-head": Dataset("taobao-userbehavior-head/UserBehavior_head.csv", "taobao",
                           {"min_user_events": 5, "min_item_events": 5}, "5-core filtered at ingest"),
}
MODELS = ("popularity", "ease", "als", "mf", "bert4rec", "sasrec")
BUDGETED = ("bert4rec", "sasrec")  # trained under --minutes
PEERS = ("popularity", "ease", "als")
WORK = CACHE / "suite"
TITLE = "# The suite: every model on every dataset, one protocol"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ---- data ---------------------------------------------------------------------------------------------------
def source_stamp(name: str) -> dict:
    """What the cached prepared data was made from: the file (path, size, mtime) and both stage configs."""
    spec = SUITE[name]
    src = DATASETS / spec.path
    st = src.stat()
    return jsonable({"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "ingest": dataclasses.asdict(IngestConfig(format=spec.format, **spec.ingest)),
                     "prepare": dataclasses.asdict(PROTOCOL)})


def data_ready(name: str) -> Path:
    """Ingest and prepare `name` under benchmarks/.cache/suite/<name>/, or reuse them when the prepared
    meta and the stamp of their making match this run's source and configs."""
    spec, base = SUITE[name], WORK / name
    ing, prep, stamp_path = base / "ingested", base / "prepared", base / "stamp.json"
    stamp = source_stamp(name)
    if (prep / "meta.json").exists() and stamp_path.exists():
        meta = json.loads((prep / "meta.json").read_text())
        if json.loads(stamp_path.read_text()) == stamp and jsonable(meta.get("config")) == stamp["prepare"]:
            say(f"{name}: prepared data reused ({prep})")
            return prep
    t = time.perf_counter()
    stamp_path.unlink(missing_ok=True)  # no stamp while the data is being remade
    r = ingest([DATASETS / spec.path], ing, IngestConfig(format=spec.format, **spec.ingest)).report
    prepare(ing, prep, PROTOCOL)
    stamp_path.write_text(json.dumps(stamp, indent=1) + "\n")
    say(f"{name}: ingested and prepared {r['users']:,} users, {r['items']:,} items, {r['rows_accepted']:,} "
        f"events in {time.perf_counter() - t:.1f}s")
    return prep


def dataset_stats(name: str, data) -> dict:
    lengths = np.fromiter((len(s) for s in data.full_sequences()), dtype=np.int64, count=data.n_users)
    report_path = WORK / name / "ingested" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    # Test targets already in the user's history (repeat consumption): the evaluator never excludes the target,
    # so on such logs ranking "seen" items is rewarded; a share far from 0 makes those figures incomparable.
    hist, test = data.histories("test"), data.test
    seen = [bool(np.isin(test[u], hist[u])) for u in range(data.n_users) if test[u] >= 0]
    return {"users": data.n_users, "items": data.n_items, "interactions": int(data.meta.get("interactions", 0)),
            "users_with_test": int((data.test >= 0).sum()),
            "history_p50": float(np.percentile(lengths, 50)), "history_p90": float(np.percentile(lengths, 90)),
            "density": float(data.meta.get("interactions", 0)) / max(data.n_users * data.n_items, 1),
            "test_target_seen_share": float(np.mean(seen)) if seen else 0.0,
            "kcore": report.get("kcore"), "rows_read": report.get("rows_read"),
            "source": str(DATASETS / SUITE[name].path), "format": SUITE[name].format,
            "ingest_overrides": SUITE[name].ingest, "events_sha256": data.meta.get("events_sha256")}


# ---- rows -----------------------------------------------------------------------------------------------------
def metrics_row(r: dict) -> dict:
    """The row's headline columns from a result with valid / test (/ test_no_refit) metric dicts."""
    row = {"test_ndcg_at_10": r["test"]["ndcg_at_10"], "test_hr_at_10": r["test"]["hr_at_10"],
           "valid_ndcg_at_10": r["valid"]["ndcg_at_10"], "valid_hr_at_10": r["valid"]["hr_at_10"]}
    if r.get("test_no_refit") is not None:
        row["test_ndcg_at_10_no_refit"] = r["test_no_refit"]["ndcg_at_10"]
        row["test_hr_at_10_no_refit"] = r["test_no_refit"]["hr_at_10"]
    return row


def run_peer(model: str, split: _peers.Split, args) -> dict:
    refit = args.refit == "on"
    log = lambda m: say(m)  # noqa: E731
    if model == "popularity":
        r = _peers.run_popularity(split, refit)
    elif model == "ease":
        r = _peers.run_ease(split, refit, max_items=args.ease_max_items, log=log)
    else:
        r = _peers.run_als(split, refit, seed=args.seed, log=log)
    if "skipped" in r:
        return {"skipped": r["skipped"], "train_seconds": None}
    row = {**metrics_row(r), "train_seconds": r["train_seconds"], "seconds_total": r["seconds"],
           "train_seconds_note": ("fit time summed over the grid" + (" and the refit" if refit else "")
                                  if model != "popularity" else "counting items"),
           "chosen": r["chosen"], "refit": args.refit}
    if not refit:
        row.pop("test_ndcg_at_10_no_refit", None)
        row.pop("test_hr_at_10_no_refit", None)
    row.update({k: r[k] for k in ("grid", "search", "precision", "version", "seed") if k in r})
    return row


def run_ours(name: str, model: str, prep: Path, args) -> dict:
    overrides = [f"pretrain.model={model}", f"pretrain.{model}.train.progress=false"]  # no progress bars in logs
    if model in BUDGETED:
        overrides.append(f"pretrain.{model}.train.max_minutes={args.minutes}")
    if args.refit == "off" and "refit" in {f.name for f in dataclasses.fields(PretrainConfig)}:
        overrides.append("pretrain.refit=false")  # the same protocol as the peers: no refit for test
    overrides += [o for o in args.set if o.startswith(f"pretrain.{model}.") or o.startswith("pretrain.refit")]
    cfg = load_config(None, overrides)
    out = WORK / name / "runs" / model
    shutil.rmtree(out, ignore_errors=True)  # a row is trained whole: no resuming another run's checkpoint
    t = time.perf_counter()
    res = pretrain(prep, cfg.pretrain, out, tracker=None, run_name=f"suite-{name}-{model}")
    wall = time.perf_counter() - t
    model_json = json.loads((Path(res.model_dir) / "model.json").read_text())
    refit_s = float(getattr(res, "refit_seconds", 0.0) or 0.0)
    no_refit = getattr(res, "test_no_refit", None)  # set when the library refit with the validation items
    row = {"test_ndcg_at_10": res.test["ndcg_at_10"], "test_hr_at_10": res.test["hr_at_10"],
           "valid_ndcg_at_10": res.valid["ndcg_at_10"], "valid_hr_at_10": res.valid["hr_at_10"],
           "train_seconds": res.fit.train_seconds + refit_s, "refit_seconds": refit_s,
           "train_seconds_note": "the library's training time (its validation passes and any grid included)"
           + (" plus its refit" if no_refit is not None else ""), "seconds_total": wall,
           "epochs": res.fit.epochs_run, "best_epoch": res.fit.best_epoch, "stopped": res.fit.stopped,
           "config": model_json.get("config"), "chosen": model_json.get("chosen"), "overrides": overrides,
           "test_protocol": "the library's test figure as pretrain returns it"
           + (" (refit on training + validation items)" if no_refit is not None else " (no refit)")}
    if no_refit is not None:
        row["test_ndcg_at_10_no_refit"], row["test_hr_at_10_no_refit"] = no_refit["ndcg_at_10"], no_refit["hr_at_10"]
    if model in BUDGETED:
        row["minutes_budget"] = args.minutes
    return row


def settings(model: str, args) -> dict:
    """What a row must have been run under to be reused."""
    if model in PEERS:
        return {"refit": args.refit, "first_only": PROTOCOL.first_only, **({"seed": args.seed} if model == "als" else {}),
                **({"ease_max_items": args.ease_max_items} if model == "ease" else {})}
    return {"refit": args.refit, "first_only": PROTOCOL.first_only,
            **({"minutes_budget": args.minutes} if model in BUDGETED else {}),
            "set": sorted(o for o in args.set if o.startswith(f"pretrain.{model}.") or o.startswith("pretrain.refit"))}


# ---- the report -----------------------------------------------------------------------------------------------
def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def by(rows: list[dict], dataset: str) -> dict[str, dict]:
    return {r["model"]: r for r in rows if r["dataset"] == dataset}


def recipe(cfg: dict | None) -> str:
    if not cfg:
        return "-"
    tr = cfg.get("train", {})
    keys = [k for k in ("dim", "loss", "regularization", "alpha", "iterations", "n_layers", "n_heads", "max_len",
                        "mask_prob", "last_item_prob", "dropout", "negatives", "window") if k in cfg]
    if cfg.get("loss") not in (None, "als"):
        keys = [k for k in keys if k not in ("regularization", "alpha", "iterations")]
    parts = [f"{k} {'chosen on validation' if cfg[k] is None else cfg[k]}" for k in keys]
    if cfg.get("loss") in ("svd", "als"):  # closed form: the training loop's settings do not apply
        return ", ".join(parts) + " (closed form; no training loop)"
    parts += [f"{k} {tr[k]}" for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "patience",
                                        "eval_every", "max_minutes", "budget_horizon") if k in tr]
    return ", ".join(parts)


def targets(dataset: str, rows: dict[str, dict]) -> list[str]:
    """The issue's targets on this dataset, computed from its rows."""
    def ndcg(m: str):
        return rows.get(m, {}).get("test_ndcg_at_10")

    def verdict(value: float, bar: float) -> str:
        ratio = value / bar if bar else float("inf")
        return (f"**met** ({value:.4f} vs {bar:.4f}, {ratio:.2f}x the bar)" if value >= bar else
                f"**falls short** ({value:.4f} vs {bar:.4f}: {ratio:.2f}x the bar, {bar - value:.4f} below)")

    out = []
    b, peers = ndcg("bert4rec"), {m: ndcg(m) for m in ("ease", "als") if ndcg(m) is not None}
    if b is not None and peers:
        best = max(peers, key=peers.get)
        missing = [m for m in ("ease", "als") if m not in peers]
        out.append(f"- bert4rec >= 1.10 x max(EASE, ALS) = 1.10 x {peers[best]:.4f} ({best.upper()}): "
                   f"{verdict(b, 1.10 * peers[best])}" + (f"; {', '.join(m.upper() for m in missing)} not in the "
                                                          "comparison (no figure)" if missing else ""))
    elif "bert4rec" in rows:
        out.append("- bert4rec >= 1.10 x max(EASE, ALS): not checked (no EASE or ALS figure)")
    sas = ndcg("sasrec")
    if sas is not None and peers:
        top = max(peers.values())
        out.append(f"- sasrec (no target of its own): {sas:.4f}, {sas / top:.2f}x max(EASE, ALS)"
                   + (f", {sas / b:.2f}x bert4rec" if b else ""))
    mf, als = ndcg("mf"), ndcg("als")
    if mf is not None and als is not None:
        out.append(f"- mf >= ALS: {verdict(mf, als)}")
    if dataset == "ml-1m" and b is not None:
        minutes = rows["bert4rec"].get("minutes_budget")
        if minutes is not None and minutes <= 10:
            out.append(f"- ML-1M bert4rec >= 0.15 within 10 minutes ({minutes:g}-min budget): {verdict(b, 0.15)}")
        elif minutes is not None and minutes <= 30:
            out.append(f"- ML-1M bert4rec >= 0.18 within 30 minutes ({minutes:g}-min budget): {verdict(b, 0.18)}")
        else:
            out.append(f"- ML-1M bert4rec >= 0.15 within 10 / 0.18 within 30 minutes: not checked (the budget was "
                       f"{minutes} min)")
    return out


def markdown(payload: dict) -> str:
    rows, stats = payload["rows"], payload.get("datasets", {})
    order = [d for d in SUITE if any(r["dataset"] == d for r in rows)]
    refit_note = ("fit again on training + validation items with the settings chosen on validation (the "
                  "validation-only fit's test figure beside it, column 'no refit')")
    refit = (payload.get("settings") or {}).get("refit", "on") == "on"
    lines = [TITLE, "",
             "Leave-last-out as `prepare` makes it (validation = each user's second-to-last item, test = the last);",
             "the whole catalogue ranked, the user's history excluded, NDCG@10 and HR@10 over every user with a",
             "target; hyper-parameters chosen on validation, reported on test.",
             "Peers on test: " + (refit_note if refit else "the validation-only fit (no refit)") + ".",
             "Ours (mf, bert4rec, sasrec): the library's defaults as they resolve for each dataset (recipes below),",
             "bert4rec and sasrec under a wall-clock budget, and the test figure `pretrain` returns. Training wall time:",
             "for the peers the fit time summed over the grid (and the refit), for ours the library's training",
             "time (its validation passes included); evaluation is not counted. 2 shared CPU cores.", "",
             *([f"**Conditions of this run:** {payload['note']}", ""] if payload.get("note") else []),
             "Peers' grids: popularity (none); EASE lambda in "
             f"{list(_peers.EASE_LAMBDAS)} (every one up to {_peers.EASE_EXHAUSTIVE_ITEMS:,} items, a hill climb "
             f"from the middle above; float32 inverse above {_peers.EASE_FLOAT64_ITEMS:,} items); implicit ALS "
             + ", ".join(f"{k} {list(v)}" for k, v in _peers.ALS_GRID.items()) + ", BLAS limited to 1 thread.", ""]

    # Summary: test NDCG@10, dataset x model.
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    lines += ["## Test NDCG@10", "", "| dataset | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for d in order:
        rs = by(rows, d)
        lines.append(f"| {d} | " + " | ".join(fmt(rs.get(m, {}).get("test_ndcg_at_10")) if m in rs and
                                               "skipped" not in rs[m] else ("skipped" if m in rs else "-")
                                               for m in models) + " |")
    lines.append("")

    lines += ["## Datasets", "", "History: each user's interactions (all of them). Test target seen: the share of test",
              "targets already in the user's history (repeats); the evaluator never excludes the target, so where",
              "this is far from 0 the figures reward re-ranking seen items and compare poorly with the others.", "",
              "| dataset | users | items | interactions | density | history p50 | history p90 | test target seen | "
              "note |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for d in order:
        s = stats.get(d)
        if s:
            kc = s.get("kcore") or {}
            note = SUITE[d].note + (f" ({kc.get('rows_removed', 0):,} rows removed in {kc.get('iterations')} passes; "
                                    f"{s.get('rows_read') or 0:,} read)" if SUITE[d].ingest and kc else "")
            lines.append(f"| {d} | {s['users']:,} | {s['items']:,} | {s['interactions']:,} | {s['density']:.4f} | "
                         f"{s['history_p50']:g} | {s['history_p90']:g} | {fmt(s.get('test_target_seen_share'), '.1%')} | "
                         f"{note} |")
    lines.append("")

    for d in order:
        rs = by(rows, d)
        lines += [f"## {d}", "", "| model | test NDCG@10 | test HR@10 | valid NDCG@10 | test NDCG@10 no refit | "
                  "train s | chosen on validation / note |", "|---|---:|---:|---:|---:|---:|---|"]
        for m in MODELS:
            r = rs.get(m)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {m} | - | - | - | - | - | {r['skipped']} |")
                continue
            if m in PEERS:
                note = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in r.get("chosen", {}).items()) or "-"
                if r.get("precision") == "float32" or (r.get("search") or "").startswith("hill"):
                    note += f"; {r.get('search')}, {r.get('precision')}"
            else:
                note = f"{r.get('epochs')} epochs, best {r.get('best_epoch')}, stopped: {r.get('stopped')}"
                if r.get("chosen"):
                    note = "chosen " + ", ".join(f"{k} {v}" for k, v in r["chosen"].items()) + "; " + note
                if r.get("minutes_budget") is not None:
                    note = f"{r['minutes_budget']:g}-min budget; " + note
            lines.append(f"| {m} | {fmt(r.get('test_ndcg_at_10'))} | {fmt(r.get('test_hr_at_10'))} | "
                         f"{fmt(r.get('valid_ndcg_at_10'))} | {fmt(r.get('test_ndcg_at_10_no_refit'))} | "
                         f"{fmt(r.get('train_seconds'), ',.1f')} | {note} |")
        lines.append("")
        for m in ("mf", *BUDGETED):
            if m in rs and rs[m].get("config"):
                lines.append(f"- {m} recipe (resolved, from model.json): {recipe(rs[m]['config'])}")
        lines.append("")

    lines += ["## Targets", "", "Computed from the rows above: bert4rec test NDCG@10 >= 1.10 x max(EASE, ALS); "
              "mf >= ALS; on ML-1M bert4rec >= 0.15 within 10 minutes and >= 0.18 within 30.", ""]
    for d in order:
        t = targets(d, by(rows, d))
        lines += [f"**{d}**", "", *(t or ["- nothing to check (models missing)"]), ""]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------
def csv_list(text: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; known: {list(known)}")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(SUITE), help=f"comma-separated, of {','.join(SUITE)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--minutes", type=float, default=10.0, help="bert4rec's and sasrec's wall-clock training budget")
    ap.add_argument("--refit", choices=("on", "off"), default="on",
                    help="refit on training + validation items for test with the settings chosen on validation: the "
                         "peers here, ours by the library's own pretrain.refit (off sets it false)")
    ap.add_argument("--ease-max-items", type=int, default=20_000, help="EASE is skipped above this catalogue size")
    ap.add_argument("--seed", type=int, default=0, help="ALS's random state")
    ap.add_argument("--fresh", action="store_true", help="rerun every requested row, even those already done")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an experiment: a config override for ours (pretrain.mf.* / pretrain.bert4rec.*), recorded "
                         "in the row; the suite itself runs with none (use another --name)")
    ap.add_argument("--name", default="suite", help="results name: benchmarks/results/NAME.{md,json}")
    ap.add_argument("--render", action="store_true", help="rewrite NAME.md from NAME.json; run nothing")
    ap.add_argument("--note", help="the conditions of the run, printed under the title (kept in NAME.json; with "
                                   "--render, replaces the stored one)")
    args = ap.parse_args()

    final, partial = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.partial.json"
    if args.render:
        payload = json.loads(final.read_text())
        if args.note is not None:
            payload["note"] = args.note
            final.write_text(json.dumps(payload, indent=2) + "\n")
        text = (RESULTS / f"{args.name}.md").read_text()
        header = text[: text.index(TITLE)] if TITLE in text else ""
        (RESULTS / f"{args.name}.md").write_text(header + markdown(payload))
        say(f"rewrote {RESULTS / f'{args.name}.md'}")
        return
    datasets = csv_list(args.datasets, list(SUITE), "datasets")
    models = csv_list(args.models, MODELS, "models")
    missing = [str(DATASETS / SUITE[d].path) for d in datasets if not (DATASETS / SUITE[d].path).is_file()]
    if missing:
        raise SystemExit("dataset files not found (read by path from ../shared/datasets): " + ", ".join(missing))

    # Rows done before: the partial file of a killed run, else the last complete results.
    state: dict = {"rows": [], "datasets": {}}
    if not args.fresh:
        for p in (partial, final):
            if p.exists():
                prev = json.loads(p.read_text())
                state = {"rows": prev.get("rows", []), "datasets": prev.get("datasets", {})}
                break
    command = " ".join([Path(sys.executable).name, *sys.argv])

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
        tmp.replace(partial)

    t_all = time.perf_counter()
    for d in datasets:
        prep = data_ready(d)
        data = load_prepared(prep)
        stats = dataset_stats(d, data)
        state["datasets"][d] = stats
        say(f"{d}: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions, "
            f"history p50 {stats['history_p50']:g} / p90 {stats['history_p90']:g}")
        split = None
        for m in models:
            want = settings(m, args)
            done = next((r for r in state["rows"] if r["dataset"] == d and r["model"] == m), None)
            if (done is not None and not args.fresh and done.get("settings") == want
                    and done.get("events_sha256") == stats["events_sha256"]):
                say(f"{d} / {m}: done before (test NDCG@10 {fmt(done.get('test_ndcg_at_10'))}), skipped")
                continue
            say(f"{d} / {m}: running")
            t = time.perf_counter()
            if m in PEERS:
                split = split or _peers.Split(data)
                row = run_peer(m, split, args)
            else:
                row = run_ours(d, m, prep, args)
            row = {"dataset": d, "model": m, "test_ndcg_at_10": None, "test_hr_at_10": None,
                   "valid_ndcg_at_10": None, "minutes_budget": None, **row, "settings": want,
                   "events_sha256": stats["events_sha256"], "command": command,
                   "date": datetime.now(UTC).isoformat(timespec="seconds")}
            state["rows"] = [r for r in state["rows"] if not (r["dataset"] == d and r["model"] == m)] + [jsonable(row)]
            save()
            say(f"{d} / {m}: " + (row["skipped"] if "skipped" in row else
                                  f"test NDCG@10 {fmt(row['test_ndcg_at_10'])} HR@10 {fmt(row['test_hr_at_10'])}, "
                                  f"valid NDCG@10 {fmt(row['valid_ndcg_at_10'])}, train {row['train_seconds']:.1f}s")
                + f" ({time.perf_counter() - t:.1f}s in all)")
    rank = {d: i for i, d in enumerate(SUITE)}
    state["rows"].sort(key=lambda r: (rank.get(r["dataset"], 99), MODELS.index(r["model"])))
    payload = {**state, **({"note": args.note} if args.note else {}), "settings": {"minutes": args.minutes, "refit": args.refit, "seed": args.seed,
                                     "ease_max_items": args.ease_max_items},
               "protocol": "leave-last-out, full ranking, history excluded, every user; chosen on validation"}
    write_results(args.name, payload, markdown(payload))
    partial.unlink(missing_ok=True)
    say(f"wrote {final} and {final.with_suffix('.md')} ({time.perf_counter() - t_all:.0f}s)")


if __name__ == "__main__":
    main()
