"""Warm start: a model initialised from a trained one, rows carried over by raw id."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from recsys_pretrain.checkpoint import build_model, item_overlap, save_model_dir, warm_start
from recsys_pretrain.config import load_config
from recsys_pretrain.models.bert4rec import BERT4RecConfig
from recsys_pretrain.models.mf import MFConfig
from recsys_pretrain.train.pretrain import pretrain
from recsys_pretrain.vocab import Vocab

CFGS = {"mf": MFConfig(dim=8), "bert4rec": BERT4RecConfig(dim=8, n_heads=2, n_layers=1, max_len=6)}


def _vocab(users, items) -> Vocab:
    return Vocab.from_ids(pl.Series(users, dtype=pl.Int64), pl.Series(items, dtype=pl.Int64))


def _saved(tmp_path, name, vocab, cfg=None):
    torch.manual_seed(1)
    model = build_model(name, cfg or CFGS[name], vocab.n_users, vocab.n_items)
    with torch.no_grad():  # biases start at zero: give them values a copy can be told apart by
        for key in ("item_bias", "bias"):
            if hasattr(model, key):
                getattr(model, key).normal_()
    n, d = vocab.n_items, (cfg or CFGS[name]).dim
    path = save_model_dir(tmp_path / f"{name}-old", name, cfg or CFGS[name], model, vocab, np.zeros((n, d)),
                          np.zeros((vocab.n_users, d)), sp.csr_matrix((vocab.n_users, n + 1)), np.ones(n))
    return model, path


@pytest.mark.parametrize("name", ["mf", "bert4rec"])
def test_rows_follow_raw_ids_new_ones_stay_fresh_and_the_network_is_copied(tmp_path, name):
    old_vocab = _vocab([1, 2, 3, 4], [10, 20, 30, 40])
    old, source = _saved(tmp_path, name, old_vocab)
    new_vocab = _vocab([2, 4, 9], [20, 40, 50])  # items 10 and 30 gone, 50 new; user 9 new
    torch.manual_seed(2)
    model = build_model(name, CFGS[name], new_vocab.n_users, new_vocab.n_items)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    info = warm_start(model, name, new_vocab, source)
    assert (info["items_carried"], info["items_new"]) == (2, 1)
    assert info["item_overlap"] == pytest.approx(2 / 3) == item_overlap(source, new_vocab)
    o, n = old.state_dict(), model.state_dict()
    # new index 1 = item 20 (old index 2), 2 = item 40 (old 4), 3 = item 50 (new: fresh row)
    assert torch.equal(n["item.weight"][1], o["item.weight"][2])
    assert torch.equal(n["item.weight"][2], o["item.weight"][4])
    assert torch.equal(n["item.weight"][3], fresh["item.weight"][3])
    if name == "mf":
        assert torch.equal(n["item_bias"][[1, 2]], o["item_bias"][[2, 4]])
        assert torch.equal(n["item_bias"][3], fresh["item_bias"][3])
        assert info["users_carried"] == 2
        assert torch.equal(n["user.weight"][0], o["user.weight"][1])  # user 2
        assert torch.equal(n["user.weight"][1], o["user.weight"][3])  # user 4
        assert torch.equal(n["user.weight"][2], fresh["user.weight"][2])  # user 9: new
    else:
        assert torch.equal(n["item.weight"][new_vocab.mask], o["item.weight"][old_vocab.mask])
        assert torch.equal(n["bias"][[1, 2, new_vocab.mask]], o["bias"][[2, 4, old_vocab.mask]])
        assert torch.equal(n["bias"][3], fresh["bias"][3])
        shared = [k for k in o if k not in ("item.weight", "bias")]
        assert shared and all(torch.equal(n[k], o[k]) for k in shared)


def test_refuses_another_model_or_architecture(tmp_path):
    vocab = _vocab([1, 2], [10, 20])
    _, source = _saved(tmp_path, "bert4rec", vocab)
    with pytest.raises(ValueError, match="cannot warm-start mf"):
        warm_start(build_model("mf", CFGS["mf"], 2, 2), "mf", vocab, source)
    wider = dataclasses.replace(CFGS["bert4rec"], max_len=12)
    with pytest.raises(ValueError, match="architecture changed"):
        warm_start(build_model("bert4rec", wider, 2, 2), "bert4rec", vocab, source)
    _, als_source = _saved(tmp_path, "mf", vocab)  # CFGS["mf"] uses the default solver, als
    softmax = dataclasses.replace(CFGS["mf"], loss="softmax")
    with pytest.raises(ValueError, match="loss 'als'"):
        warm_start(build_model("mf", softmax, 2, 2), "mf", vocab, als_source)


def test_a_warm_started_run_starts_ahead_and_trains_a_share_of_the_epochs(tiny_prepared, tmp_path):
    over = ["pretrain.model=mf", "pretrain.mf.loss=softmax", "pretrain.mf.dim=16", "pretrain.mf.train.epochs=8", "pretrain.mf.train.eval_every=1",
            "pretrain.mf.train.patience=8", "pretrain.warm_epoch_share=0.25"]
    cfg = load_config(None, over).pretrain
    scratch = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "scratch")
    warm = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "warm", init_from=scratch.model_dir)
    assert warm.warm_start["items_carried"] == 80 and warm.warm_start["item_overlap"] == 1.0
    assert warm.fit.epochs_run == 2  # 8 x 0.25
    first = [h["val_ndcg_at_10"] for h in scratch.fit.history if "val_ndcg_at_10" in h][0]
    warm_first = [h["val_ndcg_at_10"] for h in warm.fit.history if "val_ndcg_at_10" in h][0]
    assert warm_first > first


def test_the_closed_form_solver_ignores_a_warm_start_source(tiny_prepared, tmp_path):
    cfg = load_config(None, ["pretrain.model=mf", "pretrain.mf.dim=16"]).pretrain  # als
    first = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "a")
    again = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "b", init_from=first.model_dir)
    assert again.warm_start is None and again.fit.stopped == "closed_form"
    assert again.test["ndcg_at_10"] == pytest.approx(first.test["ndcg_at_10"])  # the same solve
