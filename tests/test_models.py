"""Models and the training loop on tiny data with known answers."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from recsys_pretrain.config import TrainConfig
from recsys_pretrain.data.prepared import PreparedData, history_matrix
from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.masking import mask_items
from recsys_pretrain.models import MODELS, RecModel
from recsys_pretrain.models.bert4rec import BERT4Rec, BERT4RecConfig, MaskedItemTask
from recsys_pretrain.models.mf import MFConfig, SoftmaxTask
from recsys_pretrain.train.loop import fit
from recsys_pretrain.vocab import Vocab

TINY_B4R = BERT4RecConfig(dim=32, n_layers=1, n_heads=2, max_len=12, dropout=0.0, mask_prob=0.3)


def test_registry_is_explicit():
    assert {"mf", "bert4rec"} <= set(MODELS) and all(issubclass(cls, RecModel) for cls in MODELS.values())


@pytest.mark.parametrize("name", ["mf", "bert4rec"])
def test_overfit_one_batch(name):
    torch.manual_seed(0)
    if name == "mf":
        model = MODELS["mf"](8, 20, MFConfig(dim=16))
        targets = torch.zeros(8, 20)
        targets[torch.arange(8), torch.arange(8) * 2] = 1.0  # each user one item
        batch = {"users": torch.arange(8), "targets": targets}
    else:
        model = BERT4Rec(20, TINY_B4R)
        seqs = torch.randint(1, 21, (8, 12))
        inputs, labels = mask_items(seqs, 0.3, 21, torch.Generator().manual_seed(0))
        batch = {"inputs": inputs, "labels": labels}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        _, loss = model(**batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_embedding_dot_products_are_the_model_scores():
    torch.manual_seed(0)
    mf = MODELS["mf"](5, 9, MFConfig(dim=4))
    users = torch.arange(5)
    torch.testing.assert_close(mf.user_embeddings(users.numpy(), []) @ mf.item_embeddings().T, mf.score_users(users))
    b4r = BERT4Rec(9, TINY_B4R).eval()
    hist = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8])]
    x = b4r.query_inputs(hist)
    assert x[:, -1].tolist() == [10, 10, 10] and x[0, -4:-1].tolist() == [1, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(b4r.encode(hist) @ b4r.item_embeddings().T, b4r(x)[0])


def test_sampled_softmax_trains_and_excludes_the_true_item_from_negatives():
    torch.manual_seed(0)
    model = BERT4Rec(50, TINY_B4R)
    seqs = torch.randint(1, 51, (4, 12))
    inputs, labels = mask_items(seqs, 0.3, 51, torch.Generator().manual_seed(0))
    neg = torch.arange(1, 51)  # every item, the true ones included
    logits, loss = model(inputs, labels, negatives=neg, neg_logq=torch.full((50,), -np.log(50.0)))
    y = labels[labels != 0]
    assert torch.isinf(logits[torch.arange(len(y)), y]).all()  # column y (1 + index y - 1) is the true item
    assert torch.isfinite(loss)


def _chain_data(n_users=60, n_items=30, length=10, seed=0) -> PreparedData:
    """Every user walks a cycle 1 -> 2 -> ... -> n -> 1 from a random start: the next item is known."""
    rng = np.random.default_rng(seed)
    seqs, valid, test = [], [], []
    for _ in range(n_users):
        start = rng.integers(0, n_items)
        walk = (start + np.arange(length)) % n_items + 1
        seqs.append(walk[:-2])
        valid.append(walk[-2])
        test.append(walk[-1])
    vocab = Vocab.from_ids(pl.Series(np.arange(n_users)), pl.Series(np.arange(1, n_items + 1)))
    matrix = history_matrix(seqs, n_items)
    return PreparedData(name="chain", path=None, vocab=vocab, meta={}, train_seqs=seqs, valid=np.array(valid),
                        test=np.array(test), train_matrix=sp.csr_matrix(matrix))


def test_bert4rec_learns_a_known_sequence_rule():
    torch.manual_seed(0)
    data = _chain_data()
    cfg = dataclasses.replace(TINY_B4R, last_item_prob=0.3)
    tcfg = TrainConfig(epochs=100, batch_size=16, lr=5e-3, warmup_steps=10, patience=100, eval_every=25,
                       progress=False)
    model = BERT4Rec(data.n_items, cfg)
    before = evaluate(model, data, "test")["mrr_at_10"]
    fit(model, MaskedItemTask(data.train_seqs, cfg, data.n_items, tcfg.batch_size), tcfg,
        lambda m: evaluate(m, data, "valid"))
    after = evaluate(model, data, "test")
    # the next item in the cycle is the only right answer among 21 unseen items
    assert before < 0.5 and after["mrr_at_10"] > 0.9


@pytest.mark.parametrize("loss", ["softmax", "svd"])
def test_mf_ranks_the_held_out_item_of_the_users_block_first(loss):
    # two blocks of users and items; each user saw all of their block but one item, different per user
    n_users, n_items = 40, 20
    rows, cols, held = [], [], []
    for u in range(n_users):
        block = np.arange(1, 11) if u % 2 == 0 else np.arange(11, 21)
        out = block[u % 10]
        held.append(out)
        for i in block:
            if i != out:
                rows.append(u)
                cols.append(i)
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items + 1))
    seqs = [m[u].indices for u in range(n_users)]
    vocab = Vocab.from_ids(pl.Series(np.arange(n_users)), pl.Series(np.arange(1, n_items + 1)))
    data = PreparedData(name="blocks", path=None, vocab=vocab, meta={}, train_seqs=seqs,
                        valid=np.array(held), test=np.array(held), train_matrix=m)
    torch.manual_seed(0)
    # svd: rank 2, one factor per block (a higher rank starts fitting each user's missing item as a zero)
    model = MODELS["mf"](n_users, n_items, MFConfig(dim=2 if loss == "svd" else 8, loss=loss))
    if loss == "svd":
        model.fit_svd(m)
    else:
        tcfg = TrainConfig(epochs=60, batch_size=8, lr=3e-2, weight_decay=0.0, warmup_steps=0, patience=100,
                           eval_every=20, progress=False)
        fit(model, SoftmaxTask(m, tcfg.batch_size), tcfg, lambda mm: evaluate(mm, data, "valid"))
    res = evaluate(model, data, "valid")
    assert res["hr_at_10"] == 1.0 and res["mrr_at_10"] == 1.0  # rank 1 for every user


def test_mf_svd_is_the_best_rank_k_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random((12, 15)) < 0.3) * rng.integers(1, 4, (12, 15)).astype(np.float64)
    x[:, 0] = 0.0  # column 0 is padding in a prepared matrix
    model = MODELS["mf"](12, 14, MFConfig(dim=4, loss="svd"))
    residual = model.fit_svd(sp.csr_matrix(x))
    u, s, vt = np.linalg.svd(x[:, 1:])
    best = (u[:, :4] * s[:4]) @ vt[:4]  # Eckart-Young: the best rank-4 approximation
    with torch.no_grad():
        got = model.user_embeddings(np.arange(12), []) @ model.item_embeddings().T
    np.testing.assert_allclose(got.numpy(), best, atol=1e-5)  # the item bias only breaks ties (<= 1e-6)
    pop = x[:, 1:].sum(0)
    np.testing.assert_allclose(model.item_bias[1:].detach().numpy(), 1e-6 * pop / pop.max(), rtol=1e-5)
    assert residual == pytest.approx(((x[:, 1:] - best) ** 2).sum() / (x**2).sum(), rel=1e-6)
    # more factors than the matrix has: the ones it has are fitted, the rest stay zero
    small = MODELS["mf"](3, 4, MFConfig(dim=8, loss="svd"))
    tiny = np.array([[0, 1, 0, 2, 1], [0, 0, 3, 1, 0], [0, 1, 1, 0, 2]], dtype=np.float64)
    assert 0.0 <= small.fit_svd(sp.csr_matrix(tiny)) < 1.0
    assert small.item.weight[:, 2:].abs().sum() == 0 and small.user.weight[:, :2].abs().sum() > 0


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    data = _chain_data(n_users=30)
    cfg = dataclasses.replace(TINY_B4R, dropout=0.1)  # dropout on: its RNG must be restored too
    tcfg = TrainConfig(epochs=4, batch_size=8, lr=3e-3, warmup_steps=3, patience=100, progress=False)

    def run(ckpt, kill_after=None):
        torch.manual_seed(0)
        model = BERT4Rec(data.n_items, cfg)

        def on_epoch(epoch, row):
            if kill_after is not None and epoch == kill_after:
                raise KeyboardInterrupt  # the process dies right after the epoch's checkpoint

        fit(model, MaskedItemTask(data.train_seqs, cfg, data.n_items, tcfg.batch_size), tcfg,
            lambda m: evaluate(m, data, "valid"), checkpoint_dir=ckpt, on_epoch=on_epoch)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_after=2)
    resumed = run(tmp_path / "b")
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 4 and len(ckpt["state"]["history"]) == 4
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_budget_stops_training(tmp_path):
    data = _chain_data(n_users=30)
    tcfg = TrainConfig(epochs=1000, batch_size=8, max_minutes=0.02, patience=1000, progress=False)
    model = BERT4Rec(data.n_items, TINY_B4R)
    res = fit(model, MaskedItemTask(data.train_seqs, TINY_B4R, data.n_items, 8), tcfg,
              lambda m: evaluate(m, data, "valid"))
    assert res.stopped == "budget" and res.epochs_run < 1000 and res.best_metrics



def test_patience_is_not_spent_during_the_warm_up():
    """A validation that never improves stops a run `patience` validations after the warm-up, not inside it."""
    data = _chain_data(n_users=30)  # 30 users at batch 8: 4 steps an epoch
    for warmup, first_counted in ((0, 2), (40, 10)):  # the first worse validation counted; 40 steps = epoch 10
        worse = iter(range(1, 10**6))
        tcfg = TrainConfig(epochs=100, batch_size=8, warmup_steps=warmup, patience=3, eval_every=1, progress=False)
        res = fit(BERT4Rec(data.n_items, TINY_B4R), MaskedItemTask(data.train_seqs, TINY_B4R, data.n_items, 8), tcfg,
                  lambda m, worse=worse: {"ndcg_at_10": 1.0 / next(worse)})
        assert res.stopped == "early_stopping" and res.best_epoch == 1
        assert res.epochs_run == first_counted + 2  # the 1st validation is the best; 3 worse ones counted after

def test_budget_horizon_decays_the_learning_rate_within_the_budget():
    data = _chain_data(n_users=30)
    lrs = {}
    for horizon in (True, False):
        tcfg = TrainConfig(epochs=100_000, batch_size=8, lr=1e-2, warmup_steps=0, max_minutes=0.05, patience=10**6,
                           eval_every=2, budget_horizon=horizon, progress=False)
        torch.manual_seed(0)
        res = fit(BERT4Rec(data.n_items, TINY_B4R), MaskedItemTask(data.train_seqs, TINY_B4R, data.n_items, 8), tcfg,
                  lambda m: evaluate(m, data, "valid"))
        assert res.stopped == "budget" and res.epochs_run >= 3
        lrs[horizon] = res.history[-1]["lr"]
    assert lrs[True] < 0.3 * 1e-2  # decayed over the epochs the budget fits
    assert lrs[False] > 0.99 * 1e-2  # a 100,000-epoch cosine has hardly begun


def test_killed_run_under_a_budget_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The budget's schedule horizon is kept in the checkpoint: a resumed run follows the same schedule.
    A fake clock (one second per reading) makes the budget's arithmetic the same in both runs."""
    import recsys_pretrain.train.loop as loop

    data = _chain_data(n_users=30)
    tcfg = TrainConfig(epochs=1000, batch_size=8, lr=3e-3, warmup_steps=0, patience=100, progress=False,
                       max_minutes=2.0, budget_horizon=True)

    def run(ckpt, kill_after=None):
        clock = iter(range(10**9))
        monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
        torch.manual_seed(0)
        model = BERT4Rec(data.n_items, TINY_B4R)

        def on_epoch(epoch, row):
            if kill_after is not None and epoch == kill_after:
                raise KeyboardInterrupt

        res = fit(model, MaskedItemTask(data.train_seqs, TINY_B4R, data.n_items, tcfg.batch_size), tcfg,
                  lambda m: evaluate(m, data, "valid"), checkpoint_dir=ckpt, on_epoch=on_epoch)
        return model, res

    straight, res = run(tmp_path / "a")
    assert res.stopped == "budget" and 3 <= res.epochs_run < 1000 and res.history[-1]["lr"] < 0.3 * tcfg.lr
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_after=2)
    resumed, res_b = run(tmp_path / "b")
    assert res_b.epochs_run == res.epochs_run
    assert [h["lr"] for h in res_b.history] == [h["lr"] for h in res.history]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def _varied_lengths(n=200, n_items=40, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, size=int(k)) for k in rng.integers(1, 30, size=n)]


def test_length_buckets_cover_every_sequence_once_and_trim_padding():
    seqs = _varied_lengths()
    cfg = dataclasses.replace(TINY_B4R, max_len=20, length_buckets=True)
    task = MaskedItemTask(seqs, cfg, n_items=40, batch_size=16)
    task.BUCKET_POOL = 4  # several pools
    order = task._order(torch.Generator().manual_seed(0))
    assert sorted(np.concatenate(order).tolist()) == list(range(len(seqs)))
    again = task._order(torch.Generator().manual_seed(0))
    assert all(np.array_equal(a, b) for a, b in zip(order, again, strict=True))  # a pure function of the seed
    widths, spans = [], []
    for batch in task.batches(torch.Generator().manual_seed(0)):
        real = (batch["inputs"] != 0).sum(1)
        widths.append(batch["inputs"].shape[1])
        assert batch["inputs"].shape[1] == real.max() <= 20  # padded to its own longest sequence only
        spans.append(int(real.max() - real.min()))
    flat = MaskedItemTask(seqs, dataclasses.replace(cfg, length_buckets=False), n_items=40, batch_size=16)
    flat_spans = [int((b["inputs"] != 0).sum(1).max() - (b["inputs"] != 0).sum(1).min())
                  for b in flat.batches(torch.Generator().manual_seed(0))]
    assert np.mean(spans) < 0.5 * np.mean(flat_spans)  # similar lengths share a batch


def test_token_weighting_makes_every_masked_item_count_alike():
    seqs = _varied_lengths()
    cfg = dataclasses.replace(TINY_B4R, max_len=20, token_weighted=True)
    batches = list(MaskedItemTask(seqs, cfg, n_items=40, batch_size=16).batches(torch.Generator().manual_seed(0)))
    counts = torch.tensor([float((b["labels"] != 0).sum()) for b in batches])
    scales = torch.stack([b["loss_scale"] for b in batches])
    ratio = scales / counts  # mean loss x scale = sum loss / the expected masked items per batch
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
    assert scales.min() < 0.7 < 1.3 < scales.max()  # short and long batches really differ
    # the expectation (no pass over the epoch needed) is what masking really yields on average
    task = MaskedItemTask(seqs, cfg, n_items=40, batch_size=16)
    totals = [sum(int((b["labels"] != 0).sum()) for b in task.batches(torch.Generator().manual_seed(k)))
              for k in range(300)]
    assert np.mean(totals) == pytest.approx(task.expected_targets(), rel=0.01)
    torch.testing.assert_close(ratio[0], torch.tensor(task.n_batches() / task.expected_targets()))
    model = BERT4Rec(40, cfg)
    b = batches[0]
    _, scaled = model(**b)
    _, plain = model(b["inputs"], b["labels"])
    torch.testing.assert_close(scaled, plain * b["loss_scale"])


def test_trimmed_queries_score_like_full_width_ones():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_B4R, max_len=30)
    model = BERT4Rec(40, cfg).eval()
    hist = [s[:12] for s in _varied_lengths(n=8)]
    q = model.query_inputs(hist)
    assert q.shape[1] == max(len(h) for h in hist) + 1 < cfg.max_len
    full = torch.cat([torch.zeros(len(hist), cfg.max_len - q.shape[1], dtype=q.dtype), q], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(q)[0], model(full)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("std", [None, 0.1])
def test_initialisation_choices(std):
    model = BERT4Rec(40, dataclasses.replace(TINY_B4R, init_std=std))
    assert torch.all(model.item.weight[0] == 0)  # padding row
    w = model.blocks[0].qkv.weight
    if std is not None:
        assert w.abs().max() <= 2 * std and abs(w.std().item() - std) < 0.3 * std
    else:  # PyTorch's default for Linear: uniform within 1/sqrt(fan_in)
        assert w.abs().max() <= 1 / w.shape[1] ** 0.5
