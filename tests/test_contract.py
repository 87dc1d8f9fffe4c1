"""The model contract (models/base.py), run for every model in the registry: a model added to MODELS with its
section in configs/tiny.yaml is checked by these tests without any of them naming it."""

import dataclasses

import numpy as np
import pytest
import torch

from recsys_pretrain.checkpoint import build_model, load_model_dir, warm_start
from recsys_pretrain.config import load_config
from recsys_pretrain.data.prepared import load_prepared
from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.models import MODELS, RecModel, model_class, model_name, resolve
from recsys_pretrain.recommend import Recommender
from recsys_pretrain.train.pretrain import pretrain

NAMES = sorted(MODELS)
TINY = load_config("configs/tiny.yaml", ["pretrain.refit=false"]).pretrain


def _tiny(name: str, data, **train):
    cfg, _ = resolve(name, TINY.model_config(name), data.train_seqs)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False, **train))


def _built(name: str, data, seed: int = 0) -> RecModel:
    torch.manual_seed(seed)
    return build_model(name, _tiny(name, data), data.n_users, data.n_items)


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_knows_it_and_its_config_section_loads(name):
    cls = model_class(name)
    assert issubclass(cls, RecModel) and dataclasses.is_dataclass(cls.Config)
    assert isinstance(TINY.model_config(name), cls.Config)
    over = load_config(None, [f"pretrain.model={name}", f"pretrain.{name}.train.lr=0.005"]).pretrain
    assert over.model_config().train.lr == 0.005
    assert set(cls.item_params) | set(cls.user_params)  # warm start has rows to carry over


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_dot_products_of_user_and_item_vectors(name, tiny_prepared):
    data = load_prepared(tiny_prepared["prepared"])
    model = _built(name, data).eval()
    assert model_name(model) == name
    users = np.arange(7)
    hist = data.histories("valid")
    with torch.no_grad():
        items = model.item_embeddings()  # (n_items, d')
        q = model.user_embeddings(users, [hist[u] for u in users])  # (7, d')
        fresh = model.encode([hist[u][-5:] for u in users] + [np.array([3])])  # (8, d')
    assert items.shape[0] == data.n_items and q.shape == (7, items.shape[1]) and fresh.shape == (8, items.shape[1])
    assert torch.isfinite(q).all() and torch.isfinite(fresh).all()


@pytest.mark.parametrize("name", NAMES)
def test_a_trained_model_learns_one_batch(name, tiny_prepared):
    data = load_prepared(tiny_prepared["prepared"])
    cfg = _tiny(name, data)
    if model_class(name).closed_form(cfg):
        model = _built(name, data)
        model.solve(data.train_matrix, model_class(name).candidates(cfg, False)[0][1], seed=0)
        assert evaluate(model, data, "valid")["ndcg_at_10"] > 0
        return
    model = _built(name, data).eval()  # dropout off: memorising one fixed batch is the point
    batch = next(iter(model_class(name).task(cfg, data).batches(torch.Generator().manual_seed(0))))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = model(**batch)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("name", NAMES)
def test_pretrain_saves_a_model_that_loads_scores_warm_starts_and_serves(name, tiny_prepared, tmp_path):
    cfg = dataclasses.replace(TINY, model=name)
    res = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "run")
    data = load_prepared(tiny_prepared["prepared"])
    net, meta, vocab = load_model_dir(res.model_dir)
    assert meta["model"] == name and vocab.n_items == data.n_items
    assert evaluate(net, data, "test") == pytest.approx(res.test)  # the saved weights are the reported model
    items = np.load(res.model_dir / "item_embeddings.npy")
    np.testing.assert_allclose(items, net.item_embeddings().detach().numpy(), rtol=1e-5, atol=1e-6)

    # warm start from the saved model: rows by raw id, the rest copied
    fresh = build_model(name, dataclasses.replace(net.cfg), data.n_users, data.n_items)
    info = warm_start(fresh, name, vocab, res.model_dir)
    assert info["items_carried"] == data.n_items
    torch.testing.assert_close(fresh.item_embeddings(), net.item_embeddings())

    # served: a known user's answer is the model's own top-k among unseen items; a fresh history is encoded
    rec = Recommender.load(res.model_dir)
    got = rec.recommend(vocab.user_ids(np.array([0])), k=5)[0]
    with torch.no_grad():
        scores = (net.user_embeddings(np.array([0]), [data.full_sequences()[0]]) @ net.item_embeddings().T)[0]
    scores[torch.as_tensor(np.unique(data.full_sequences()[0]) - 1)] = -torch.inf
    assert got.ids == vocab.item_ids((torch.topk(scores, 5).indices + 1).numpy())
    fresh_answer = rec.recommend_for_history([vocab.item_ids(np.array([1, 2]))], k=5)[0]
    assert len(fresh_answer.ids) == 5 and fresh_answer.method == model_class(name).encode_method
