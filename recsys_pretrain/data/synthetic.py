"""Seeded synthetic behaviour logs that carry real signal: taste, popularity, sequence and a funnel.

The world:
- categories have random centres; an item's vector lies near its category centre, and a user's taste
  vector near the centre of a favourite category (plus noise, so other categories matter too);
- item popularity is Zipf over a random ranking, entering as a bias, so that
  affinity(u, i) = <user_vec, item_vec> + item_bias and exp(affinity) = taste x popularity;
- every item has a few fixed "next" items (mostly in its category): the sequential signal.

A user's log is a run of steps grouped into sessions. At each step the user is shown a slate of
`impressions_per_step` items drawn by taste x popularity and clicks one of them. With probability
`p_sequential` the click instead continues from the previous click: one of its successors, placed in
the slate at a random slot. After a click, add_to_cart, purchase (only after a cart) and favorite
happen with probability sigmoid(funnel_slope * affinity + offset).

All users of a chunk are simulated in lockstep over the step index with NumPy. Users draw their
randomness from per-block streams (`_BLOCK` users each) up front, so the output depends on the config
only: not on `chunk_users`, and adding users leaves the earlier ones unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain.io import atomic_path

EVENT_TYPES = ("impression", "click", "add_to_cart", "favorite", "purchase")
IMPRESSION, CLICK, ADD_TO_CART, FAVORITE, PURCHASE = range(5)
COLUMNS = ("user_id", "item_id", "timestamp", "event_type", "session_id", "category_id", "value")
SCHEMA = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "timestamp": pl.Int64,
    "event_type": pl.String,
    "session_id": pl.Int64,
    "category_id": pl.Int64,
    "value": pl.Float64,
}
# session_id = user_id * SESSION_STRIDE + the session's number within the user (0, 1, ...)
SESSION_STRIDE = 1_000_000

_BLOCK = 256  # users per random stream
_DAY = 86_400
# Seconds between the parts of a step: fixed minimum + exponential with this mean.
# Columns: slate -> click, click -> favorite, favorite -> cart, cart -> purchase, step end -> next slate.
_GAP_MIN = np.array([2.0, 3.0, 5.0, 20.0, 5.0])
_GAP_MEAN = np.array([8.0, 10.0, 20.0, 90.0, 40.0])
_SESSION_GAP = 1_800.0  # at least 30 minutes between the end of a session and the next one


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 2000
    n_items: int = 1000
    n_categories: int = 20
    events_per_user: float = 60.0  # mean number of logged events (all types, impressions included) per user
    dim: int = 16
    zipf_exponent: float = 1.05
    p_sequential: float = 0.5
    impressions_per_step: int = 4
    n_days: int = 30
    start: str = "2024-01-01T00:00:00+00:00"
    seed: int = 0
    # world shape
    n_successors: int = 5  # "next" items per item
    p_successor_same_category: float = 0.8
    taste_strength: float = 3.0  # norm of user taste vectors: how peaked tastes are
    user_spread: float = 0.7  # user noise around the favourite category centre (relative)
    item_spread: float = 0.5  # item noise around its category centre
    click_temperature: float = 1.0  # click choice ~ softmax(<user, item> / temperature) within the slate
    # funnel: P(event | click) = sigmoid(funnel_slope * affinity + offset); purchase is given add_to_cart
    funnel_slope: float = 1.0
    cart_offset: float = -6.5
    purchase_offset: float = -7.0
    favorite_offset: float = -8.0
    # activity and sessions
    activity_shape: float = 1.5  # events per user ~ 1 + negative binomial, this shape (smaller: longer tail)
    p_new_session: float = 0.25  # chance that a step starts a new session

    def __post_init__(self) -> None:
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "1 <= n_categories <= n_items": 1 <= self.n_categories <= self.n_items,
            "events_per_user >= 1": self.events_per_user >= 1,
            "dim >= 1": self.dim >= 1,
            "impressions_per_step >= 1": self.impressions_per_step >= 1,
            "n_successors >= 1": self.n_successors >= 1,
            "n_days >= 1": self.n_days >= 1,
            "0 <= p_sequential <= 1": 0.0 <= self.p_sequential <= 1.0,
            "0 <= p_new_session <= 1": 0.0 <= self.p_new_session <= 1.0,
            "click_temperature > 0": self.click_temperature > 0,
            "activity_shape > 0": self.activity_shape > 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid SynthConfig: need {', '.join(failed)}")
        _start_epoch(self.start)  # fail early on a bad date


@dataclass(frozen=True)
class _World:
    """Everything about items and categories (0-based indices)."""

    centres: np.ndarray  # (n_categories, dim)
    item_vecs: np.ndarray  # (n_items, dim) float32
    item_bias: np.ndarray  # (n_items,)
    item_category: np.ndarray  # (n_items,)
    item_price: np.ndarray  # (n_items,)
    successors: np.ndarray  # (n_items, n_successors)
    successor_logw: np.ndarray  # (n_successors,) the first successor link is the strongest
    cat_logmass: np.ndarray  # (n_categories,) log of the popularity mass of each category
    by_cat: np.ndarray  # (n_items,) item indices grouped by category
    cat_key: np.ndarray  # (n_items,) category + within-category popularity CDF, aligned with by_cat


def _start_epoch(start: str) -> int:
    dt = datetime.fromisoformat(start)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _rng(cfg: SynthConfig, *key: int) -> np.random.Generator:
    # Independent streams from one seed: key (0,) is the world, (1, b) is user block b.
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=key))


def _make_world(cfg: SynthConfig) -> _World:
    rng = _rng(cfg, 0)
    n, n_cat, d = cfg.n_items, cfg.n_categories, cfg.dim
    # uneven category sizes, none empty
    sizes = 1 + rng.multinomial(n - n_cat, rng.dirichlet(np.full(n_cat, 2.0)))  # (n_cat,)
    category = rng.permutation(np.repeat(np.arange(n_cat), sizes))  # (n,)
    centres = rng.standard_normal((n_cat, d)) / np.sqrt(d)
    item_vecs = (centres[category] + cfg.item_spread * rng.standard_normal((n, d)) / np.sqrt(d)).astype(
        np.float32
    )
    # Zipf over a random popularity ranking (ids carry no popularity); bias = log(p_i * n), so a
    # uniform catalogue would have bias 0 everywhere.
    rank = rng.permutation(n) + 1
    logp = -cfg.zipf_exponent * np.log(rank)
    logp -= np.log(np.exp(logp - logp.max()).sum()) + logp.max()
    bias = logp + np.log(n)
    # price: a typical level per category, jittered per item
    cat_price = np.exp(rng.uniform(np.log(5.0), np.log(200.0), n_cat))
    price = np.maximum(np.round(cat_price[category] * np.exp(0.3 * rng.standard_normal(n)), 2), 0.01)

    by_cat = np.argsort(category, kind="stable")  # (n,)
    cat_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (n_cat,)

    # Successors: mostly a random item of the same category (not popularity-weighted, so that the
    # transition signal is not just popularity again), otherwise any item. No self-loops.
    m = cfg.n_successors
    size_i = sizes[category][:, None]  # (n, 1)
    within = np.floor(rng.random((n, m)) * size_i).astype(np.int64)  # (n, m)
    same = by_cat[cat_start[category][:, None] + within]
    shifted = by_cat[cat_start[category][:, None] + (within + 1) % size_i]
    same = np.where(same == np.arange(n)[:, None], shifted, same)
    anywhere = rng.integers(0, n, (n, m))
    anywhere = np.where(anywhere == np.arange(n)[:, None], (anywhere + 1) % n, anywhere)
    use_same = (rng.random((n, m)) < cfg.p_successor_same_category) & (size_i > 1)
    successors = np.where(use_same, same, anywhere)

    # Inverse-CDF sampling of an item by popularity within a category: keys of category c lie in
    # (c, c + 1], so one searchsorted over all categories serves every query.
    w = np.exp(bias[by_cat])  # (n,)
    cat_mass = np.add.reduceat(w, cat_start)  # (n_cat,)
    cum = np.cumsum(w)
    cat_sorted = category[by_cat]
    within_cdf = (cum - (cum[cat_start] - w[cat_start])[cat_sorted]) / cat_mass[cat_sorted]
    within_cdf = np.minimum(within_cdf, 1.0)
    within_cdf[np.cumsum(sizes) - 1] = 1.0  # exact ends keep categories apart
    return _World(
        centres=centres,
        item_vecs=item_vecs,
        item_bias=bias,
        item_category=category,
        item_price=price,
        successors=successors,
        successor_logw=-np.log1p(np.arange(m)),
        cat_logmass=np.log(cat_mass),
        by_cat=by_cat,
        cat_key=cat_sorted + within_cdf,
    )


def _columns(cfg: SynthConfig) -> tuple[dict[str, slice], int]:
    """Layout of the per-step random row: name -> columns."""
    k = cfg.impressions_per_step
    widths = {
        "cat": k, "item": k, "fill": k, "click": k,  # slate and click choice
        "seq": 1, "slot": 1, "succ": cfg.n_successors,  # sequential click
        "cart": 1, "purchase": 1, "favorite": 1,  # funnel
        "new_session": 1, "session_pos": 1, "gaps": len(_GAP_MIN),  # time
    }  # fmt: skip
    cols, at = {}, 0
    for name, width in widths.items():
        cols[name] = slice(at, at + width)
        at += width
    return cols, at


def _block_users(cfg: SynthConfig, b: int, with_steps: bool = True) -> dict[str, np.ndarray]:
    """Draw block b's users: taste, activity, and one row of uniforms per step they will take."""
    # Always a full block, trimmed to the users that exist at the end, so that a user's draws do not
    # depend on n_users.
    rng = _rng(cfg, 1, b)
    size = min(_BLOCK, cfg.n_users - b * _BLOCK)
    fav = rng.integers(0, cfg.n_categories, _BLOCK)[:size]
    out = {"fav": fav, "z": rng.standard_normal((_BLOCK, cfg.dim))[:size]}
    if not with_steps:
        return out
    # negative binomial + 1 has mean events_per_user exactly and a long tail of heavy users
    shape, excess = cfg.activity_shape, cfg.events_per_user - 1.0
    n_events = 1 + (rng.negative_binomial(shape, shape / (shape + excess), _BLOCK) if excess > 0 else 0)
    n_events = np.broadcast_to(n_events, (_BLOCK,)).astype(np.int64)
    # every step logs at least k impressions + 1 click, so this many steps always reach n_events
    n_steps = -(-n_events // (cfg.impressions_per_step + 1))
    _, width = _columns(cfg)
    rows = rng.random((int(n_steps[:size].sum()), width), np.float32)  # users in order, so a prefix is theirs
    out.update(n_events=n_events[:size], n_steps=n_steps[:size], rows=rows)
    return out


def _user_vecs(cfg: SynthConfig, world: _World, fav: np.ndarray, z: np.ndarray) -> np.ndarray:
    # near the favourite category's centre; the noise gives secondary tastes
    vecs = cfg.taste_strength * (world.centres[fav] + cfg.user_spread * z / np.sqrt(cfg.dim))
    return vecs.astype(np.float32)  # (n, dim)


def _users(cfg: SynthConfig, world: _World, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Users lo..hi-1 (0-based), cut out of the blocks that hold them."""
    b0, b1 = lo // _BLOCK, (hi - 1) // _BLOCK + 1
    blocks = [_block_users(cfg, b) for b in range(b0, b1)]
    i0, i1 = lo - b0 * _BLOCK, hi - b0 * _BLOCK
    n_steps = np.concatenate([blk["n_steps"] for blk in blocks])
    ends = np.concatenate([[0], np.cumsum(n_steps)])
    rows = np.concatenate([blk["rows"] for blk in blocks])[ends[i0] : ends[i1]]
    fav = np.concatenate([blk["fav"] for blk in blocks])[i0:i1]
    z = np.concatenate([blk["z"] for blk in blocks])[i0:i1]
    return {
        "vecs": _user_vecs(cfg, world, fav, z),
        "n_events": np.concatenate([blk["n_events"] for blk in blocks])[i0:i1],
        "n_steps": n_steps[i0:i1],
        "rows": rows,
    }


def _dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise dot products, u (n, d) with v (n, d) or (n, k, d).

    Elementwise rather than BLAS, so a user's numbers never depend on how many users share the batch.
    """
    return (v * (u if v.ndim == 2 else u[:, None, :])).sum(-1)


def _gumbel(u: np.ndarray) -> np.ndarray:
    # float32 uniforms are multiples of 2^-24 in [0, 1): half a step keeps the logs finite
    return -np.log(-np.log(u.astype(np.float64) + 2.0**-25))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _simulate_steps(cfg: SynthConfig, world: _World, users: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run every user's steps; returns per-step arrays in user-major order (user, then step)."""
    cols, _ = _columns(cfg)
    k, n_cat = cfg.impressions_per_step, cfg.n_categories
    n_steps, rows = users["n_steps"], users["rows"]
    n_users, total = len(n_steps), len(rows)
    step_start = np.cumsum(n_steps) - n_steps  # (n_users,) first row of each user

    # Users sorted by step count, longest first: the users still active at step t are then a
    # prefix, so per-user state is sliced rather than gathered.
    order = np.argsort(-n_steps, kind="stable")
    vecs, start = users["vecs"][order], step_start[order]
    n_active = n_users - np.cumsum(np.bincount(n_steps))  # (max_steps + 1,) users with more than t steps

    # Each user's category mix for the slate, P(c | u) ~ popularity mass(c) * exp(<u, centre_c>),
    # flattened with keys of user j in (j, j + 1] for one vectorised inverse-CDF lookup.
    logits = _dot(vecs, np.broadcast_to(world.centres, (n_users, *world.centres.shape))) + world.cat_logmass
    prob = np.exp(logits - logits.max(1, keepdims=True))
    cdf = np.minimum(np.cumsum(prob / prob.sum(1, keepdims=True), axis=1), 1.0)  # (n_users, n_cat)
    cdf[:, -1] = 1.0
    user_key = (np.arange(n_users)[:, None] + cdf).ravel()  # (n_users * n_cat,)

    slate = np.empty((total, k), np.int64)
    click = np.empty(total, np.int64)
    last = np.full(n_users, -1)  # previous click per user (prefix order); -1 = none yet
    temp = cfg.click_temperature
    for t in range(len(n_active) - 1):
        na = n_active[t]
        pos = start[:na] + t  # (na,) row of (user, t) in the user-major step arrays
        r = rows[pos]  # (na, width)
        u, j = vecs[:na], np.arange(na)

        # taste x popularity: a category from the user's mix, then an item by popularity within it
        cat = np.searchsorted(user_key, j[:, None] + r[:, cols["cat"]], side="right") - j[:, None] * n_cat
        at = np.searchsorted(world.cat_key, cat + r[:, cols["item"]], side="right")
        items = world.by_cat[at]  # (na, k)
        # Click by taste only: popularity already shaped the slate, and counting it twice would make
        # the click distribution far steeper than the configured Zipf.
        clicked = np.argmax(_dot(u, world.item_vecs[items]) / temp + _gumbel(r[:, cols["click"]]), axis=1)

        # sequential steps: the click is a successor of the last click, chosen by link strength x taste
        seq = np.flatnonzero((last[:na] >= 0) & (r[:, cols["seq"]][:, 0] < cfg.p_sequential))  # (ns,)
        if seq.size:
            succ = world.successors[last[seq]]  # (ns, m)
            util = world.successor_logw + _dot(u[seq], world.item_vecs[succ]) / temp
            util += _gumbel(r[seq][:, cols["succ"]])
            slot = (r[seq][:, cols["slot"]][:, 0] * k).astype(np.int64)  # (ns,)
            items[seq, slot] = succ[np.arange(seq.size), np.argmax(util, axis=1)]
            clicked[seq] = slot

        # A slate shows distinct items: a repeat keeps the clicked copy (else the first), the others
        # become a uniformly random item (exploration; may rarely repeat again).
        is_click = np.zeros((na, k), bool)
        is_click[j, clicked] = True
        same = items[:, :, None] == items[:, None, :]  # (na, k, k): [n, a, b] = item a == item b
        wins = is_click[:, :, None] | np.triu(np.ones((k, k), bool), 1)  # slot a beats slot b
        dup = (same & wins & ~np.eye(k, dtype=bool)).any(axis=1) & ~is_click  # (na, k)
        fill = (r[:, cols["fill"]] * cfg.n_items).astype(np.int64)
        items = np.where(dup, fill, items)

        slate[pos] = items
        click[pos] = last[:na] = items[j, clicked]

    # funnel, all steps at once: chances rise with the affinity of the clicked item
    user_of_step = np.repeat(np.arange(n_users), n_steps)  # (total,)
    affinity = _dot(users["vecs"][user_of_step], world.item_vecs[click]) + world.item_bias[click]
    z = cfg.funnel_slope * affinity
    cart = rows[:, cols["cart"]][:, 0] < _sigmoid(z + cfg.cart_offset)
    purchase = cart & (rows[:, cols["purchase"]][:, 0] < _sigmoid(z + cfg.purchase_offset))
    favorite = rows[:, cols["favorite"]][:, 0] < _sigmoid(z + cfg.favorite_offset)
    return {
        "user": user_of_step,
        "step_start": step_start,
        "slate": slate,
        "click": click,
        "cart": cart,
        "purchase": purchase,
        "favorite": favorite,
    }


def _step_times(cfg: SynthConfig, steps: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Seconds from `start` of each step's slate, delays of its other events, and session numbers."""
    cols, _ = _columns(cfg)
    user, step_start = steps["user"], steps["step_start"]
    total = len(user)
    t = np.arange(total) - step_start[user]
    new_session = (t == 0) | (rows[:, cols["new_session"]][:, 0] < cfg.p_new_session)

    gaps = _GAP_MIN - _GAP_MEAN * np.log1p(-rows[:, cols["gaps"]].astype(np.float64))  # (total, 5)
    delays = np.cumsum(gaps[:, :4], axis=1)  # (total, 4) click, favorite, cart, purchase after the slate
    length = delays[:, -1] + gaps[:, 4]  # (total,) a step's span, thinking time included

    # position of each step inside its session
    session = np.cumsum(new_session) - 1  # (total,) session index within the chunk
    first = np.flatnonzero(new_session)  # (n_sessions,) first step of each session
    before = np.cumsum(length) - length
    offset = before - before[first][session]
    duration = np.add.reduceat(length, first) + _SESSION_GAP  # (n_sessions,)

    # Sessions go at sorted uniform positions within the time the user's sessions leave free when packed
    # end to end, then each is pushed back by the ones before it: no overlaps, all inside the window.
    s_user = user[first]  # (n_sessions,)
    user_first = session[step_start]  # (n_users,) index of each user's first session
    pos = np.sort(s_user + rows[first, cols["session_pos"]][:, 0].astype(np.float64)) - s_user
    before_s = np.cumsum(duration) - duration
    prior = before_s - before_s[user_first][s_user]
    free = np.maximum(cfg.n_days * _DAY - np.add.reduceat(duration, user_first), 0.0)  # (n_users,)
    session_start = pos * free[s_user] + prior
    return {
        "slate_time": session_start[session] + offset,
        "delays": delays,
        "session_no": session - user_first[user],
    }


def _chunk_frame(cfg: SynthConfig, world: _World, lo: int, hi: int) -> pl.DataFrame:
    """Events of users lo..hi-1 (0-based), ordered by user then time."""
    users = _users(cfg, world, lo, hi)
    steps = _simulate_steps(cfg, world, users)
    times = _step_times(cfg, steps, users["rows"])
    k = cfg.impressions_per_step
    fav, cart, buy = steps["favorite"], steps["cart"], steps["purchase"]

    # Each step logs k impressions, its click, then favorite / add_to_cart / purchase if they happened:
    # scatter them straight to their final place instead of sorting.
    n_ev = k + 1 + fav + cart + buy  # (total,)
    ev_start = np.cumsum(n_ev) - n_ev
    n = int(n_ev.sum())
    item, etype, secs = np.empty(n, np.int64), np.empty(n, np.int8), np.empty(n)
    slate_time, delays = times["slate_time"], times["delays"]

    at = ev_start[:, None] + np.arange(k)  # (total, k)
    item[at], etype[at], secs[at] = steps["slate"], IMPRESSION, slate_time[:, None]
    at = ev_start + k
    item[at], etype[at], secs[at] = steps["click"], CLICK, slate_time + delays[:, 0]
    for code, mask, at, col in (
        (FAVORITE, fav, ev_start + k + 1, 1),
        (ADD_TO_CART, cart, ev_start + k + 1 + fav, 2),
        (PURCHASE, buy, ev_start + k + 1 + fav + 1, 3),
    ):
        item[at[mask]], etype[at[mask]] = steps["click"][mask], code
        secs[at[mask]] = (slate_time + delays[:, col])[mask]

    # Cut each user to exactly their drawn event count: the tail of the last step goes, and as events
    # are in time order, no cart or purchase ever loses the click before it.
    step_of = np.repeat(np.arange(len(n_ev)), n_ev)  # (n,)
    user = steps["user"][step_of]
    keep = np.arange(n) - ev_start[steps["step_start"]][user] < users["n_events"][user]
    item, etype, secs, user, step_of = item[keep], etype[keep], secs[keep], user[keep], step_of[keep]

    user_id = lo + 1 + user
    horizon = cfg.n_days * _DAY - 1
    value = np.where(etype == PURCHASE, world.item_price[item], np.nan)
    return pl.DataFrame(
        {
            "user_id": user_id,
            "item_id": item + 1,
            # floor and clip are monotone, so time order survives the rounding
            "timestamp": _start_epoch(cfg.start) + np.minimum(np.floor(secs), horizon).astype(np.int64),
            "event_type": pl.Series(etype).replace_strict(
                list(range(len(EVENT_TYPES))), list(EVENT_TYPES), return_dtype=pl.String
            ),
            "session_id": user_id * SESSION_STRIDE + times["session_no"][step_of],
            "category_id": world.item_category[item] + 1,
            "value": pl.Series(value, nan_to_null=True),
        },
        schema=SCHEMA,
    )


def generate(
    cfg: SynthConfig, chunk_users: int = 20_000, progress: Callable[[int], None] | None = None
) -> Iterator[pl.DataFrame]:
    """Yield the log in chunks of users (bounded memory), rows ordered by user then time.

    The concatenated output does not depend on `chunk_users`. `progress` gets the users done per chunk.
    """
    if chunk_users < 1:
        raise ValueError("chunk_users must be >= 1")
    world = _make_world(cfg)
    for lo in range(0, cfg.n_users, chunk_users):
        hi = min(lo + chunk_users, cfg.n_users)
        yield _chunk_frame(cfg, world, lo, hi)
        if progress is not None:
            progress(hi - lo)


def ground_truth(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """The latent world behind `generate(cfg)`: vectors, biases, categories, prices, successors, params.

    Rows are indexed by raw id - 1; category ids and successors are raw ids (starting at 1).
    """
    world = _make_world(cfg)
    parts = [_block_users(cfg, b, with_steps=False) for b in range(-(-cfg.n_users // _BLOCK))]
    fav = np.concatenate([p["fav"] for p in parts])
    z = np.concatenate([p["z"] for p in parts])
    params = ("funnel_slope", "cart_offset", "purchase_offset", "favorite_offset", "click_temperature")
    return {
        "user_vecs": _user_vecs(cfg, world, fav, z),
        "item_vecs": world.item_vecs,
        "item_bias": world.item_bias,
        "item_category": world.item_category + 1,
        "item_price": world.item_price,
        "successors": world.successors + 1,
        "user_favorite_category": fav + 1,
        **{name: np.float64(getattr(cfg, name)) for name in params},
        "config": np.array(json.dumps(asdict(cfg))),
    }


def true_affinity(truth: dict | Path, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Affinity for (user, item) raw-id pairs, from the truth file; the oracle score for later AUC checks."""
    if not isinstance(truth, dict):
        with np.load(truth, allow_pickle=False) as f:
            truth = {name: f[name] for name in ("user_vecs", "item_vecs", "item_bias")}
    u = np.asarray(users, np.int64) - 1
    i = np.asarray(items, np.int64) - 1
    uv = truth["user_vecs"][u].astype(np.float64)
    iv = truth["item_vecs"][i].astype(np.float64)
    return (uv * iv).sum(1) + truth["item_bias"][i]


def write_synthetic(
    cfg: SynthConfig,
    out: Path,
    fmt: str = "csv",
    truth: Path | None = None,
    chunk_users: int = 20_000,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the log to `out` ('csv' with a header, or 'parquet') chunk by chunk, atomically.

    Optionally write the ground truth (`ground_truth(cfg)`) to `truth` as .npz, also atomically.
    Returns a summary: rows, rows per event type, users, items, path.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    out = Path(out)
    rows = 0
    per_type = dict.fromkeys(EVENT_TYPES, 0)
    users = 0
    items_seen = np.zeros(cfg.n_items + 1, bool)

    def tally(df: pl.DataFrame) -> None:
        nonlocal rows, users
        rows += df.height
        for name, count in df["event_type"].value_counts().iter_rows():
            per_type[name] += count
        users += df["user_id"].n_unique()  # chunks hold disjoint users
        items_seen[df["item_id"].unique().to_numpy()] = True

    with atomic_path(out) as tmp:
        chunks = generate(cfg, chunk_users, progress)
        if fmt == "csv":
            with open(tmp, "wb") as fh:
                for n, df in enumerate(chunks):
                    df.write_csv(fh, include_header=n == 0)
                    tally(df)
        else:
            import pyarrow.parquet as pq  # only for Parquet output, which is rare

            writer = None
            try:
                for df in chunks:
                    table = df.to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                    tally(df)
            finally:
                if writer is not None:
                    writer.close()

    if truth is not None:
        with atomic_path(truth) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **ground_truth(cfg))
    return {
        "path": str(out),
        "format": fmt,
        "rows": rows,
        "rows_per_event_type": per_type,
        "users": users,
        "items": int(items_seen.sum()),
        "truth": None if truth is None else str(truth),
    }
