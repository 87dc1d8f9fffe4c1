"""SASRec's own behaviour (the contract tests in test_contract.py run it like every model): causal attention,
next-item targets at every position, and a known answer learnt from sequences with a fixed successor."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.models.sasrec import NextItemTask, SASRec, SASRecConfig
from recsys_pretrain.train.loop import fit
from recsys_pretrain.train_config import TrainConfig
from tests.test_models import _chain_data

CFG = SASRecConfig(dim=32, n_layers=1, n_heads=2, max_len=10, dropout=0.0)


def test_a_position_sees_only_itself_and_earlier_items():
    torch.manual_seed(0)
    model = SASRec(30, CFG).eval()
    a = torch.tensor([[0, 0, 3, 7, 9, 12]])
    b = a.clone()
    b[0, -1] = 25  # change the newest item only
    with torch.no_grad():
        ha, hb = model.encode_inputs(a), model.encode_inputs(b)
    torch.testing.assert_close(ha[:, :-1], hb[:, :-1])  # earlier outputs do not see it
    assert not torch.allclose(ha[:, -1], hb[:, -1])
    assert torch.isfinite(ha).all()  # padding rows attend to themselves: no NaN


def test_targets_are_each_positions_next_item():
    seqs = [np.array([5, 6, 7, 8]), np.array([1]), np.array([2, 3])]
    task = NextItemTask(seqs, dataclasses.replace(CFG, max_len=3), n_items=10, batch_size=8)
    assert len(task.seqs) == 2  # one item: no target
    (batch,) = list(task.batches(torch.Generator().manual_seed(0)))
    rows = {tuple(r[r > 0].tolist()): y[y > 0].tolist() for r, y in zip(batch["inputs"], batch["labels"], strict=True)}
    assert rows == {(6, 7): [7, 8], (2,): [3]} or rows == {(5, 6, 7): [6, 7, 8], (2,): [3]}
    assert task.expected_targets() == 3 + 1  # window of max_len + 1 = 4 items: 3 targets, and 1


def test_learns_a_known_sequence_rule():
    torch.manual_seed(0)
    data = _chain_data()  # every user walks a cycle 1 -> 2 -> ... -> n -> 1: the next item is known
    tcfg = TrainConfig(epochs=40, batch_size=16, lr=5e-3, warmup_steps=10, patience=100, eval_every=20,
                       progress=False)
    model = SASRec(data.n_items, CFG)
    before = evaluate(model, data, "test")["mrr_at_10"]
    fit(model, NextItemTask(data.train_seqs, CFG, data.n_items, tcfg.batch_size), tcfg,
        lambda m: evaluate(m, data, "valid"))
    assert before < 0.5 and evaluate(model, data, "test")["mrr_at_10"] > 0.9


def test_the_nightly_steps_train_promote_warm_start_and_publish_it(tmp_path, monkeypatch, capsys):
    """The flow's own steps (flows/nightly.py wires exactly these) with flow.models = [sasrec]."""
    from recsys_pretrain import cli
    from recsys_pretrain import nightly as N
    from recsys_pretrain.config import load_config
    from recsys_pretrain.registry import get_alias_version
    from recsys_pretrain.vocab import Vocab

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    over = [f"data_dir={tmp_path / 'data'}", f"flow.tracking_uri={uri}", "flow.models=[sasrec]",
            "flow.serving_order=[sasrec]", "flow.full_retrain_every=0"]
    cfg = load_config("configs/tiny.yaml", over)
    prepared = N.prepare_step(N.ingest_step(N.synthesize_log(cfg), cfg), cfg)
    first = N.pretrain_step(prepared, "sasrec", cfg, uri, None)
    assert N.promote_step("recsys-sasrec", first, prepared, cfg, uri)["promoted"]
    second = N.pretrain_step(prepared, "sasrec", cfg, uri, None)  # the champion exists: a warm start
    assert second["warm_start"] and "warm start from champion v1" in second["init"]
    assert N.publish_index_step(cfg, uri)["model"] == "models:/recsys-sasrec@champion"
    assert get_alias_version("recsys-sasrec", "champion", uri)["version"] == 1

    user = Vocab.load(Path(prepared) / "vocab.json").users[0]
    pointer = str(tmp_path / "data" / "tiny" / "serving" / "current.json")
    capsys.readouterr()
    argv = ["--config", "configs/tiny.yaml", "recommend", "--index", pointer, "--user", str(user), "-k", "5",
            "--json", *over]
    assert cli.main(argv) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    assert len(answer["items"]) == 5 and answer["method"] == "user_vector"
    argv[argv.index("--user"):argv.index("--user") + 2] = ["--history", "1,2,3"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["method"] == "sasrec_history"
