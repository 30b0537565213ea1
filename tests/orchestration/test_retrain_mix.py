"""`sslstream retrain` over a weighted mix of data.train: the snapshot covers every source
and the training config keeps the mix, each source pinned to its snapshot's shards."""

from __future__ import annotations

from sslstream.orchestration.retrain import job as R
from sslstream.orchestration.schema import compose_config
from sslstream.pipelines.shards.snapshot import take_snapshot


def test_the_training_config_keeps_the_mix_on_the_snapshot(shard_factory, tmp_path) -> None:
    a = shard_factory([4, 4], prefix="a")
    b = shard_factory([3, 5, 2], prefix="b")
    cfg = compose_config([
        "data=shards", f"data.train=[{{url: {a.root}, weight: 3}}, {{url: {b.root}, weight: 1}}]",
        "data.test=null", "eval.at_end=false", f"trainer.output_dir={tmp_path / 'out'}"])
    st = R.RetrainSettings.from_config(cfg, "enc")
    assert st.source == [str(a.root), str(b.root)]  # every source is watched
    snap = take_snapshot(st.source)
    assert len(snap.shards) == 5
    tcfg = R._train_config(cfg, "key", snap, None)
    train = [dict(s) for s in tcfg.data.train]
    assert [s["weight"] for s in train] == [3.0, 1.0]
    assert [list(s["url"]) for s in train] == [a.urls, b.urls]
    assert list(tcfg.data.bank) == snap.urls  # the evaluation bank: every shard once
