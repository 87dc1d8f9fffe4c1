import json

import polars as pl

from recsys_pretrain.cli import main
from tests.conftest import ROOT


def test_run_on_tiny_config_end_to_end(tmp_path, capsys):
    code = main(["--config", str(ROOT / "configs" / "tiny.yaml"), "run", f"data_dir={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Ingest report" in out and "rows read" in out
    root = tmp_path / "tiny"  # the flow's paths: ingested/<content hash>, prepared/<same>
    (ingested,) = (p for p in (root / "ingested").iterdir() if not p.name.startswith("."))
    (prepared,) = (p for p in (root / "prepared").iterdir() if not p.name.startswith("."))
    assert f"ingested: {ingested}" in out and f"prepared: {prepared}" in out and prepared.name == ingested.name
    report = json.loads((ingested / "report.json").read_text())
    assert report["rows_read"] == report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]
    assert report["users"] == 200 and report["rows_read"] > 200 * 20
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["loo"]["users_with_test"] > 150 and meta["temporal"]["available"]
    # one row per user with at least one interaction (a user who only saw impressions has none)
    assert 150 < pl.read_parquet(prepared / "loo.parquet").height <= meta["n_users"]
    assert sorted(p.name for p in prepared.iterdir() if not p.name.startswith(".")) == [
        "loo.parquet", "meta.json", "train_matrix.npz", "vocab.json"]


def test_ingest_cli_with_overrides_and_bad_file(write, tmp_path, capsys):
    src = write("log.csv", "user_id,item_id,timestamp,event_type\n1,2,1700000000,pv\n1,3,1700000001,buy\n"
                           "2,2,1700000002,pv\nx,2,1700000003,pv\n")
    assert main(["ingest", str(src), "--format", "generic", "--out", str(tmp_path / "out"), "id_type=int"]) == 0
    out = capsys.readouterr().out
    assert f"quarantined: {src} row 4: bad_user_id (field user_id)" in out
    assert main(["ingest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "nope.csv: no such file" in err
    assert main(["ingest", str(src), "--out", str(tmp_path / "o3"), "min_user_event=2"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s.parquet"), "--fmt", "parquet", "--users", "30",
                 "--items", "40", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    df = pl.read_parquet(tmp_path / "s.parquet")
    assert summary["rows"] == df.height and df["user_id"].n_unique() == 30
