"""`SampleStream`: ShardStream and the tests' FakeStream both have every member the loaders
call, with the types the Protocol declares, so no loader needs to probe a stream."""

from __future__ import annotations

import inspect
import pickle

import pytest
from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.shards.stream import ShardStream

from tests.pipelines.augment_helpers import FakeStream, make_samples

SPECIAL = ("__len__", "__iter__")


def members() -> dict[str, str]:
    """name -> "attribute" | "property" | "method" as SampleStream declares it."""
    out = {name: "attribute" for name in SampleStream.__annotations__}
    for name, value in vars(SampleStream).items():
        if name.startswith("_") and name not in SPECIAL:
            continue
        out[name] = "property" if isinstance(value, property) else "method"
    return out


def test_the_protocol_lists_what_the_loaders_use():
    assert set(members()) == {
        "rank", "world_size", "partition", "validate", "num_workers", "lane_pool", "position",
        "__len__", "__iter__", "set_epoch", "state_dict", "load_state_dict", "counters",
        "epoch_bad", "count_bad", "set_external_bad"}


def test_shard_stream_and_the_fake_implement_every_member(shard_factory):
    streams = [ShardStream(shard_factory([6, 5]).urls, num_workers=1), FakeStream(make_samples(4))]
    for stream in streams:
        for name, kind in members().items():
            value = getattr(stream, name)  # AttributeError names the missing member
            if kind == "method":
                params = inspect.signature(getattr(SampleStream, name)).parameters
                assert list(inspect.signature(value).parameters) == list(params)[1:], name
        assert isinstance(stream.counters, dict) and isinstance(stream.epoch_bad, int)
        first = iter(stream)
        next(first)
        first.close()  # a generator: an abandoned epoch is closed
    # the reader process's handle on its lane processes never travels with a pickled stream
    streams[0].lane_pool = object()
    assert pickle.loads(pickle.dumps(streams[0])).lane_pool is None


def test_bad_samples_a_consumer_reports_count_toward_the_streams_limit(shard_factory):
    from sslstream.pipelines.shards.badsamples import report_bad
    from sslstream.pipelines.shards.sample import BadDataError

    stream = ShardStream(shard_factory([10]).urls, num_workers=0, max_bad_fraction=0.2)
    report_bad(stream, [("undecodable", "s0"), ("bad_image", "s0")])
    assert stream.epoch_bad == 2 and stream.counters["undecodable"] == 1
    with pytest.raises(BadDataError, match="max_bad_fraction=0.2") as e:
        report_bad(stream, [("undecodable", "s0")])  # 3 of 10
    assert e.value.shard == "s0"
