"""Promotion compares like with like (issue 16): a version evaluated on another labelled
split, or with another protocol, is registered as challenger with that reason."""

from __future__ import annotations

import math
import shutil

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import compose_config
from sslstream.orchestration.errors import RegistrationError
from sslstream.orchestration.tracking.registry import RegistrySettings, register_encoder
from sslstream.orchestration.train.evalid import PROTOCOL_TAG, SPLIT_TAG, eval_identity

HEALTHY = {"eval/embedding_std": 0.2, "eval/effective_rank": 10.0}


def test_a_run_evaluated_on_another_split_cannot_become_champion(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = RegistrySettings(name="enc", await_ready_s=5)
    src = tmp_path / "model"
    src.mkdir()
    same = {SPLIT_TAG: "test:aaaa,bank:train", PROTOCOL_TAG: "knn k=200 t=0.1, 32px, 1234"}

    def register(acc: float, **identity: str):
        return register_encoder(uri, str(src), settings, metrics={"eval/knn_acc": acc, **HEALTHY},
                                feature_dim=32, tags={**same, **identity})

    assert register(0.5).promoted                                         # v1: first champion
    other_split = register(0.9, **{SPLIT_TAG: "test:bbbb,bank:train"})    # v2: a smoke test
    assert not other_split.promoted
    assert "not comparable with champion v1: evaluated on another labelled split" in other_split.reason
    other_protocol = register(0.9, **{PROTOCOL_TAG: "knn k=20 t=0.1, 16px, 9999"})
    assert not other_protocol.promoted and "evaluation protocol" in other_protocol.reason
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert int(client.get_model_version_by_alias("enc", "champion").version) == 1
    assert int(client.get_model_version_by_alias("enc", "challenger").version) == 3
    assert register(0.6).promoted                                         # like with like: wins
    assert int(client.get_model_version_by_alias("enc", "champion").version) == 4
    # the switch restores the plain comparison
    loose = RegistrySettings(name="enc", await_ready_s=5, require_comparable=False)
    d = register_encoder(uri, str(src), loose, metrics={"eval/knn_acc": 0.95, **HEALTHY},
                         feature_dim=32, tags={**same, SPLIT_TAG: "test:cccc,bank:train"})
    assert d.promoted


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from sslstream.pipelines.shards.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("syn")
    ensure_synthetic(root / "a", train_samples=40, test_samples=20, image_size=8, seed=0)
    shutil.copytree(root / "a", root / "copy")           # the same shards elsewhere
    ensure_synthetic(root / "b", train_samples=40, test_samples=20, image_size=8, seed=1)
    return root


def test_split_fingerprint_follows_content_and_protocol_follows_settings(splits):
    def ident(root, *extra):
        return eval_identity(compose_config([f"data.root={splits / root}", *extra]))

    a = ident("a")
    assert a[SPLIT_TAG].endswith(",bank:train") and "spec-" not in a[SPLIT_TAG]
    assert ident("copy")[SPLIT_TAG] == a[SPLIT_TAG]     # same bytes, another folder
    assert ident("b")[SPLIT_TAG] != a[SPLIT_TAG]        # other images
    assert ident("a", f"data.bank={splits / 'b' / 'train'}")[SPLIT_TAG] != a[SPLIT_TAG]
    assert ident("a", "eval.batch_size=7", "eval.every_epochs=3") == a  # no effect on numbers
    assert ident("a", "eval.knn_k=20")[PROTOCOL_TAG] != a[PROTOCOL_TAG]
    assert ident("a", "augment.view1.size=16", "augment.view2.size=16")[PROTOCOL_TAG] != a[PROTOCOL_TAG]


def test_an_unevaluated_version_is_a_challenger_and_never_the_champion(tmp_path):
    """A run on unlabelled data (no kNN) registers its encoder: challenger, evaluated=false,
    and neither takes the champion alias nor lets a missing metric pass unnoticed."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = RegistrySettings(name="enc", await_ready_s=5)
    src = tmp_path / "model"
    src.mkdir()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    first = register_encoder(uri, str(src), settings, metrics={}, feature_dim=32,
                             evaluated=False)
    assert not first.promoted and first.previous_champion is None
    assert "not evaluated" in first.reason and math.isnan(first.metric)
    with pytest.raises(MlflowException):  # no champion at all yet
        client.get_model_version_by_alias("enc", "champion")
    v1 = client.get_model_version("enc", "1")
    assert v1.tags["evaluated"] == "false" and v1.tags["promoted"] == "false"
    assert int(client.get_model_version_by_alias("enc", "challenger").version) == 1

    assert register_encoder(uri, str(src), settings, metrics={"eval/knn_acc": 0.3, **HEALTHY},
                            feature_dim=32).promoted                     # v2: champion
    later = register_encoder(uri, str(src), settings, metrics={"perf/run_img_per_s": 9.0},
                             feature_dim=32, evaluated=False)             # v3
    assert not later.promoted and later.previous_champion == 2
    assert int(client.get_model_version_by_alias("enc", "champion").version) == 2
    assert int(client.get_model_version_by_alias("enc", "challenger").version) == 3
    assert client.get_model_version("enc", "2").tags["evaluated"] == "true"
    # an evaluated registration without its metric is still an error, not an unevaluated one
    with pytest.raises(RegistrationError, match="lack the promotion metric"):
        register_encoder(uri, str(src), settings, metrics={}, feature_dim=32)
