"""Typed configuration: one frozen dataclass per stage, composed into `RunConfig`.

Configs load from YAML plus `key=value` overrides (`ingest.min_user_events=5`). Unknown keys fail
loudly with the list of valid ones, so a typo never passes silently.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys_pretrain.data.synthetic import SynthConfig
from recsys_pretrain.models import MODELS
from recsys_pretrain.train_config import TrainConfig


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class IngestConfig:
    format: str = "generic"  # generic | movielens | sasrec | taobao | retailrocket
    # generic format only: canonical column -> column name in the source (missing = same name)
    columns: dict[str, str] = field(default_factory=dict)
    id_type: str = "str"  # generic format only: "str" keeps ids as text, "int" requires integers
    # "epoch_s" | "epoch_ms" | "epoch_us" | "iso" (ISO 8601 text) | any strftime format
    timestamp_format: str = "epoch_s"
    # valid time window; None = the format's own window, else 1990-01-01..2100-01-01 UTC
    min_time: str | None = None
    max_time: str | None = None
    event_aliases: dict[str, str] = field(default_factory=dict)  # added to schema.DEFAULT_EVENT_ALIASES
    dedupe: bool = True  # drop exact repeats of (user, item, timestamp, event_type)
    min_user_events: int = 0  # k-core filter, applied iteratively with min_item_events until stable
    min_item_events: int = 0
    # Inputs estimated at up to `in_memory_rows` events are sorted and de-duplicated in memory (fast);
    # larger ones in user ranges of about `partition_rows` events each (memory bounded by the range).
    in_memory_rows: int = 16_000_000
    partition_rows: int = 5_000_000
    # Pseudonymise user ids (recsys_pretrain/privacy.py): the HMAC-SHA256 key is read from this environment
    # variable or this file (one of them). Only the names are config; the key is never stored or logged.
    pseudonymise_key_env: str | None = None
    pseudonymise_key_file: str | None = None


@dataclass(frozen=True)
class PrepareConfig:
    # events that count as interactions in sequences and the matrix (impressions are exposure, not interest)
    sequence_event_types: tuple[str, ...] = ("click", "add_to_cart", "favorite", "purchase", "rating")
    collapse_repeats: bool = False  # merge consecutive repeats of one item in a sequence
    # keep only each user's first interaction with an item: every held-out target is then an item the user
    # has not interacted with before (what serving, which excludes seen items, is asked to find)
    first_only: bool = False
    # weight of each event type in the user x item matrix; repeats add up
    event_weights: dict[str, float] = field(
        default_factory=lambda: {
            "click": 1.0,
            "add_to_cart": 2.0,
            "favorite": 2.0,
            "purchase": 4.0,
            "rating": 1.0,
        }
    )
    # global temporal split: ISO time, or a quantile of event times in (0, 1) written as a number
    temporal_cutoff: str | float = 0.9
    min_train_items: int = 1  # users need at least this many training items to get validation/test targets


@dataclass(frozen=True)
class _PretrainSettings:
    """The pretraining stage's own settings; `PretrainConfig` adds one section per registered model."""

    # a name in recsys_pretrain.models.MODELS; sasrec led bert4rec on five suite datasets and was level on ML-100k
    # (benchmarks/results/suite_cadence.md, suite_ml1m_sasrec_idle.md, suite_sasrec_rest.md)
    model: str = "sasrec"
    experiment: str | None = None  # MLflow experiment; None = named after the dataset
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite in data_dir
    warm_epoch_share: float = 0.25  # a warm-started run trains this share of the epoch budget
    # A checkpoint in the output directory is resumed only if the same run wrote it (run-defining config,
    # data, warm-start source). match: refuse another run's checkpoint; restart: start anew over it;
    # never: always start anew.
    resume: str = "match"
    # After the model is chosen on validation, refit it with each user's validation item included (the
    # closed-form solvers solve again on train + validation): test is reported on the refit model, and on
    # the chosen one as test_no_refit.
    refit: bool = True
    # Trained models refit by continuing from the chosen epoch on train + validation sequences for this share
    # of the training (epochs and, under max_minutes, the budget: the chosen model gets the rest).
    refit_share: float = 0.15

    def model_config(self, name: str | None = None) -> Any:
        """The config section of model `name` (default: `self.model`)."""
        name = self.model if name is None else name
        if name not in MODELS:
            raise ConfigError(f"pretrain.model: unknown model {name!r}; known: {sorted(MODELS)}")
        return getattr(self, name)


# `pretrain.<name>` for every model in the registry, typed by the model's own config class.
PretrainConfig = dataclasses.make_dataclass(
    "PretrainConfig",
    [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in MODELS.items()],
    bases=(_PretrainSettings,), frozen=True,
)
PretrainConfig.__module__ = __name__


@dataclass(frozen=True)
class LabelConfig:
    """Click and purchase labels, split in time: pretraining < T1 <= fine-tuning < T2 <= test."""

    pretrain_cutoff: str | float = 0.6  # T1: ISO time or quantile of event times
    test_cutoff: str | float = 0.8  # T2
    click_window_s: int = 3600  # an impression is clicked if the same item is clicked this soon after
    purchase_window_s: int = 86_400  # a click converts if the item is bought this soon after
    negatives_per_positive: int = 4  # logs without impressions: popularity-sampled unseen items
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    init: str = "finetuned"  # frozen | finetuned | random
    label_fraction: float = 1.0  # share of the fine-tuning labels used (by user-stratified sampling)
    pretrained_lr_scale: float = 0.1  # learning rate of pretrained embeddings relative to the heads
    # mf solver of the ranker's pretraining before T1 (nightly flow, benchmarks/finetune.py): softmax, the one
    # benchmarks/results/finetune.md measured; svd factors (user vectors scaled by singular values) are not
    # measured as ranker inputs yet
    pretrain_mf_loss: str = "softmax"
    hidden: int = 64
    valid_share: float = 0.1  # of the fine-tuning labels, held out for early stopping
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=512, lr=3e-3, weight_decay=1e-4,
                                            warmup_steps=0, patience=3, eval_every=1, schedule="constant")
    )


@dataclass(frozen=True)
class GateConfig:
    """The nightly flow's two gates: data quality before training, and champion vs challenger."""

    max_volume_change: float = 0.5  # |events tonight / events last night - 1| above this stops the flow
    max_quarantine_rate: float = 0.05  # quarantined / read above this stops the flow
    max_unknown_item_share: float = 0.5  # share of tonight's items unseen last night above this stops it
    metric: str = "test/ndcg_at_10"  # the promotion metric, higher is better
    margin: float = 0.0  # a challenger must beat the champion by more than this


@dataclass(frozen=True)
class FlowConfig:
    inputs: tuple[str, ...] = ()  # raw logs; empty = generate the synthetic log (`synth`)
    models: tuple[str, ...] = ("mf", "sasrec")  # names in recsys_pretrain.models.MODELS, trained in this order
    # the index published for serving is the champion of the first of these that has one
    serving_order: tuple[str, ...] = ("sasrec", "bert4rec", "mf")
    finetune: bool = True
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite in data_dir
    registry_prefix: str = "recsys"  # registered models: <prefix>-mf, <prefix>-sasrec, <prefix>-ranker
    schedule_cron: str = "0 2 * * *"  # nightly at 02:00
    # Warm start: pretrain from the champion's weights when at least this share of tonight's items is known
    # to it, except every `full_retrain_every`-th night (counted in data/<name>/state.json), which trains
    # from scratch so that drift cannot accumulate.
    warm_start: bool = True
    warm_start_min_overlap: float = 0.8
    full_retrain_every: int = 7  # 0 = never
    timezone: str = "UTC"
    # data-parallel ranks per training run: > 1 runs each model's pretraining as `recsys-pretrain pretrain
    # --nproc N` (torchrun on this machine; rank 0 writes and tracks)
    nproc: int = 1
    gates: GateConfig = field(default_factory=GateConfig)
    # Partitioned, incremental ingest (recsys_pretrain/data/partitions.py): inputs grouped by day (a
    # `date=YYYY-MM-DD` folder or a YYYY-MM-DD in the file name) are ingested into hive partitions under
    # data/<name>/partitions; a night ingests only new or changed days, fanned out on Dask, and the vocabulary
    # is append-only. Off = the monolithic ingest of every input each night.
    partitioned: bool = False
    dask_address: str | None = None  # an existing Dask scheduler ("tcp://host:8786"); None = a LocalCluster
    dask_workers: int | None = None  # LocalCluster workers (None = Dask's default)
    dask_processes: bool = True  # LocalCluster workers as processes (False = threads of the flow's process)
    retention_days: int | None = None  # train on the last N days of partitions only (None = all)
    retention_delete: bool = False  # also delete partitions older than the window (else kept on disk)


@dataclass(frozen=True)
class IndexConfig:
    """The FAISS candidate index over a model's item vectors (recsys_pretrain/index.py)."""

    # a faiss.index_factory string ("Flat", "HNSW32", "IVF4096,Flat"; "{nlist}" = about 4 sqrt(n_items)), or auto
    factory: str = "auto"
    auto_flat_max_items: int = 50_000  # auto: exact Flat up to this many items, auto_factory above
    # IVF, not HNSW: on clustered, popularity-skewed vectors (benchmarks/index.py, 200k items) IVF with
    # the L2 reduction reached recall@10/@100 0.95 at nprobe 4 (p99 0.3 ms); HNSW32 needed efSearch 1536
    # (p99 5 ms). The full 1M run is the reference.
    auto_factory: str = "IVF{nlist},Flat"
    # auto above this many items: compressed codes, added in parallel shards and merged into on-disk inverted
    # lists (index.build_sharded_index), re-ranked exactly from the memory-mapped item vectors. Up to it, an
    # IVF-Flat index holds 4 d + 8 bytes per item in RAM (0.5 GB at 2M x 64 d) and one process adds it in
    # minutes; at 10M x 64 d the PQ codes take 33 + 8 bytes per item (benchmarks/results/index_10m.md).
    auto_compressed_min_items: int = 2_000_000
    # "{pq}" = ceil(index dim / pq_dims) PQ sub-quantizers of 8 bits (the index dim is the model's, +1 for the
    # l2 reduction, padded with zero columns to a multiple of the PQ's sub-quantizer count)
    auto_compressed_factory: str = "IVF{nlist},PQ{pq}"
    pq_dims: int = 2  # dimensions per PQ byte in "{pq}": 2 = 4 bits per dimension (64 d: 33 bytes per item)
    # FAISS candidates fetched per requested result and re-ranked by the exact inner product from the stored
    # float32 vectors. 0 = auto: 1 for exact codes (Flat, IVF-Flat, HNSW), 10 for compressed codes (PQ, SQ),
    # whose own ranking is approximate.
    refine_factor: int = 0
    # Sharded build: items split in `shards` contiguous ranges, each added to a copy of the trained (empty)
    # index in its own process, then merged with faiss.contrib.ondisk.merge_ondisk. 0 = auto: one shard per
    # `shard_items` above auto_compressed_min_items, else 1 (the in-memory build).
    shards: int = 0
    shard_items: int = 2_500_000
    shard_workers: int = 0  # processes adding shards at once; 0 = min(shards, cores)
    # How an approximate index searches by inner product. ip: directly | l2: reduced to L2 nearest
    # neighbour by one extra coordinate. Measured (tests/test_index.py, benchmarks/index.py): HNSW over
    # raw inner products stays below 0.95 recall@100 however large efSearch (0.74 on the tests' data,
    # 0.86 at 200k items), and IVF over raw inner products needs several times the nprobe.
    # Exact Flat always searches by inner product.
    mips: str = "l2"
    ef_construction: int = 100  # HNSW graph quality; build time grows with it (efSearch is tuned after)
    train_size: int = 262_144  # items sampled to train IVF centroids / PQ / SQ codebooks (the train sample)
    target_recall: float = 0.95  # recall against exact search that efSearch / nprobe is tuned to reach
    tune_ks: tuple[int, ...] = (10, 100)  # ... at each of these k (serving over-fetches past 10)
    search_param: int | None = None  # a fixed efSearch / nprobe instead of tuning
    tune_queries: int = 2000  # real user vectors sampled to measure recall
    tune_latency_queries: int = 200  # of those, timed one at a time
    threads: int = 0  # faiss OpenMP threads; 0 = faiss's default
    seed: int = 0
    experiment: str = "index"  # MLflow experiment of index builds


@dataclass(frozen=True)
class ServeConfig:
    """Candidate serving: the Python API's limits and the HTTP service (recommend.py, serve.py)."""

    model: str | None = None  # model directory, MLflow run id, or models:/NAME@ALIAS
    index: str | None = None  # index directory; None = an exact index built in memory at start
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    default_k: int = 10
    max_k: int = 1000
    max_history: int = 1000  # items in one POSTed history
    max_body_bytes: int = 1_000_000
    categories: str | None = None  # table (parquet / csv) with item_id, category_id: the category filter
    reranker: str | None = None  # MLflow pyfunc URI scoring (user_id, item_id) pairs; None = model order
    reranker_column: str = "p_ctcvr"  # the column to rank by when the pyfunc returns a table
    rerank_pool: int = 100  # candidates fetched for the re-ranker to reorder
    # How often the service looks at what it follows, and swaps in a new model + index when it changed: the
    # pointer file (index=.../serving/current.json, as the nightly flow publishes), else the index directory
    # and the model's alias (model=models:/NAME@ALIAS). Before the first publication it waits, not ready.
    # 0 = never: only POST /admin/reload swaps.
    reload_poll_s: float = 5.0
    # uvicorn's access log (off by default). Paths carry user ids: with a user key configured the id in
    # /recommend/{user_id} is written as <user> in it.
    access_log: bool = False
    # privacy: the key user ids were pseudonymised with at ingest (as ingest.pseudonymise_key_env / _file:
    # the name of an environment variable or a key file, never the key). Set, /recommend/{user_id} takes raw
    # ids and hashes them as ingest did; re-read at every (re)load. user_id_type: the ingest format's id type
    # ("int" hashes "0042" as "42", as ingest read it; "str" takes the text as it is).
    user_key_env: str | None = None
    user_key_file: str | None = None
    user_id_type: str = "str"
    # faiss OpenMP threads per search: requests already run in parallel threads, and a team of OpenMP
    # threads per single query only adds wake-up latency (milliseconds when the cores are busy)
    faiss_threads: int = 1
    # where MLflow model directories are downloaded (one subdirectory per run, reused across reloads);
    # None = a temp directory per server, its old runs pruned after each reload and removed at exit
    cache_dir: str | None = None
    # Bearer token for POST /admin/reload and the admin views (filesystem paths in /metadata and errors);
    # None = $RECSYS_ADMIN_TOKEN. With neither, the admin routes answer only on a loopback bind (host).
    # Prefer the environment: a config value travels wherever the config is logged.
    admin_token: str | None = field(default=None, repr=False)
    # Registered MLflow models a re-ranker may come from (models:/NAME@ALIAS or models:/NAME/VERSION).
    # Loading a pyfunc runs its pickled code: this is the trust boundary; empty = no re-ranker at all.
    trusted_reranker_names: tuple[str, ...] = ("recsys-ranker",)
    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this (else 408, closed)
    body_timeout_s: float = 30.0  # ... and its body within this once the headers are in (else closed)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16_384  # request line + headers; over it: 431 (400 when it arrives in pieces)
    limit_concurrency: int = 1000  # open connections + running requests before new requests get 503; 0 = none


@dataclass(frozen=True)
class TuneConfig:
    """The hyper-parameter search over one model's pretraining (recsys_pretrain/tune.py): Optuna's TPE
    sampler, trials pruned on their per-epoch validation NDCG@10, within a total wall-clock budget."""

    model: str = "sasrec"  # a name in recsys_pretrain.models.MODELS
    minutes: float = 60.0  # total budget: no trial starts unless its cap (plus export) still fits
    trial_max_minutes: float | None = None  # per-trial cap, the model's train.max_minutes; None = minutes / 4
    n_trials: int | None = None  # at most this many trials; None = as many as the budget allows
    seed: int = 0  # the sampler's seed; every trial trains with the model's own train.seed
    sampler_startup_trials: int = 10  # TPE: random trials before it models the results
    pruner: str = "median"  # median (Optuna's MedianPruner) | none
    pruner_startup_trials: int = 3  # finished trials before any trial may be pruned
    pruner_warmup_steps: int = 5  # epochs of a trial before it may be pruned (steps are epochs)
    # Dotted keys of the pretrain section under the model ("bert4rec.dim", "bert4rec.train.lr") to a
    # distribution: {type: categorical, choices: [...]} | {type: float, low, high, log?, step?} |
    # {type: int, low, high, log?, step?}. Nested mappings ({bert4rec: {dim: {...}}}) work too, so that
    # `tune.space.mf.dim=...` overrides do. Empty = the model's default space (its `search_space`).
    space: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    data_dir: str = "data"
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def _convert(tp: Any, value: Any, key: str, base: Any = None) -> Any:
    """Coerce a YAML or override value to the annotated type, or raise ConfigError naming the key.
    A nested section is merged onto `base`, the default it replaces, so one key can change alone."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.", base=base)
    if origin in (typing.Union, types.UnionType):
        errors = []
        # An arm the value already is wins (0.8 stays a float in `str | float`).
        arms = sorted(typing.get_args(tp), key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
        for arm in arms:
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(arm, value, key)
            except (ConfigError, TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return tuple(_convert(inner, v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a plain mapping onto `base` (default: `cls()`), checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid: {sorted(names)}")
    base = cls() if base is None else base
    changes = {k: _convert(hints[k], v, prefix + k, base=getattr(base, k)) for k, v in data.items()}
    return dataclasses.replace(base, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML) onto a nested mapping, returning a new one."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)
