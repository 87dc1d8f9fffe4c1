import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_pretrain.masking import append_mask, mask_items

MASK = 99


@st.composite
def batches(draw):
    B = draw(st.integers(1, 8))
    T = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    seqs = torch.zeros(B, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        seqs[r, T - n :] = torch.tensor(draw(st.lists(st.integers(1, 50), min_size=n, max_size=n)))
    return seqs


@settings(max_examples=200, deadline=None)
@given(seqs=batches(), p=st.floats(0.01, 0.99), last=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 10**6))
def test_masking_rules(seqs, p, last, seed):
    inputs, labels = mask_items(seqs, p, MASK, torch.Generator().manual_seed(seed), last_prob=last)
    real = seqs != 0
    masked = labels != 0
    assert not (masked & ~real).any()  # only real positions
    assert masked.any(1).all()  # at least one per sequence
    many = real.sum(1) >= 2
    assert not (masked.sum(1)[many] == real.sum(1)[many]).any()  # never all
    assert torch.equal(inputs[masked], torch.full_like(inputs[masked], MASK))
    assert torch.equal(inputs[~masked], seqs[~masked])  # the rest untouched, padding stays padding
    assert torch.equal(labels[masked], seqs[masked])


def test_masking_is_a_pure_function_of_the_generator():
    seqs = torch.randint(1, 50, (16, 30))
    a = mask_items(seqs, 0.2, MASK, torch.Generator().manual_seed(7))
    b = mask_items(seqs, 0.2, MASK, torch.Generator().manual_seed(7))
    c = mask_items(seqs, 0.2, MASK, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    rate = (a[1] != 0).float().mean().item()
    assert 0.12 < rate < 0.28  # close to the asked-for rate


def test_last_item_mode_masks_only_the_newest_item():
    seqs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    inputs, labels = mask_items(seqs, 0.5, MASK, torch.Generator().manual_seed(0), last_prob=1.0)
    assert labels.tolist() == [[0, 0, 0, 0, 5], [0, 0, 0, 0, 5]]
    assert inputs[:, -1].tolist() == [MASK, MASK]


def test_append_mask():
    h = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8]])
    assert append_mask(h, MASK).tolist() == [[0, 1, 2, MASK], [6, 7, 8, MASK]]
