import pytest

from recsys_pretrain.config import ConfigError, TrainConfig, load_config, to_dict
from recsys_pretrain.models.mf import MFConfig

ROOT_CONFIGS = ["configs/default.yaml", "configs/tiny.yaml"]


@pytest.mark.parametrize("path", ROOT_CONFIGS)
def test_shipped_configs_load(path):
    from tests.conftest import ROOT

    cfg = load_config(ROOT / path)
    assert cfg.ingest.format == "generic" and cfg.synth.n_users > 0


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["ingest.min_user_events=5", "prepare.temporal_cutoff=0.8", "ingest.dedupe=false",
                             "prepare.sequence_event_types=click,purchase"])
    assert cfg.ingest.min_user_events == 5 and cfg.ingest.dedupe is False
    assert cfg.prepare.temporal_cutoff == 0.8
    assert cfg.prepare.sequence_event_types == ("click", "purchase")


def test_unknown_keys_and_bad_types_fail_loudly(tmp_path):
    with pytest.raises(ConfigError, match="ingest.min_user_event"):
        load_config(None, ["ingest.min_user_event=5"])
    with pytest.raises(ConfigError, match="ingest.min_user_events"):
        load_config(None, ["ingest.min_user_events=lots"])
    bad = tmp_path / "c.yaml"
    bad.write_text("prepare: [1, 2]\n")
    with pytest.raises(ConfigError, match="prepare"):
        load_config(bad)


def test_flatten_for_tracking():
    from recsys_pretrain.tracking import flatten_params

    flat = flatten_params(to_dict(load_config(None)))
    assert flat["ingest.format"] == "generic" and "prepare.event_weights.purchase" in flat


def test_nested_sections_merge_onto_their_defaults():
    cfg = load_config(None, ["pretrain.mf.train.lr=0.02", "pretrain.bert4rec.n_layers=3"])
    assert cfg.pretrain.mf.train.lr == 0.02
    assert cfg.pretrain.mf.train.eval_every == MFConfig().train.eval_every != TrainConfig().eval_every  # MF's own
    assert cfg.pretrain.bert4rec.n_layers == 3 and cfg.pretrain.bert4rec.dim is None  # derived from the data
