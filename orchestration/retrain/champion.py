"""The retraining job's view of MLflow: champion, its data snapshot, versions by run key.

Every registry read and write that `sslstream retrain` makes (orchestration/retrain/job.py
decides on what these return): the champion and the snapshot it was trained on, the version
a run key already registered, and the decision tags. Promotion itself is
orchestration/tracking/registry.py's rule (`register_encoder`); nothing here re-implements it.

Tags written (all prefixed `retrain.`, on the training run and on the model version):
`run_key`, `snapshot_id`, `source`, `shards`, `new_shards`, `decision`, `reason`, `init`.
The full shard listing is the run artifact `retrain/snapshot.json`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sslstream.orchestration.tracking.registry import ChampionInfo, RegistrySettings, read_champion
from sslstream.pipelines.shards.snapshot import Snapshot

TAG = "retrain."
SNAPSHOT_ARTIFACT = "retrain/snapshot.json"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


class RetrainRegistry:
    """MLflow calls of the retraining job; every method raises on a tracking failure."""

    def __init__(self, uri: str, settings: RegistrySettings, experiment: str) -> None:
        self.uri, self.settings, self.experiment = uri, settings, experiment
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    @property
    def name(self) -> str:
        return self.settings.name

    def champion(self) -> ChampionInfo | None:
        return read_champion(self.uri, self.name, alias=self.settings.champion_alias,
                             metric=self.settings.metric)

    def champion_fingerprints(self, champion: ChampionInfo) -> dict[str, str] | None:
        """name -> fingerprint of the shards the champion was trained on, None if unknown."""
        if not champion.run_id or TAG + "snapshot_id" not in champion.tags:
            return None
        with tempfile.TemporaryDirectory(prefix="sslstream-snap-") as tmp:
            try:
                path = self.client.download_artifacts(champion.run_id, SNAPSHOT_ARTIFACT, tmp)
            except FileNotFoundError:
                return None
            except MlflowException as e:  # a missing listing is "unknown"; an outage raises
                if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                    return None
                raise
            snap = Snapshot.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        if snap.id != champion.tags[TAG + "snapshot_id"]:
            return None
        return snap.fingerprints()

    def _runs_named(self, run_name: str) -> list[str]:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        runs = self.client.search_runs(
            [exp.experiment_id], filter_string=f"attributes.run_name = {_quote(run_name)}",
            max_results=50)
        return [r.info.run_id for r in runs]

    def find_version(self, run_key: str) -> int | None:
        """The registered version made by run `run_key` (by tag, else by its run's name)."""
        try:
            found = self.client.search_model_versions(
                f"name = {_quote(self.name)} and tags.`{TAG}run_key` = {_quote(run_key)}")
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        if found:
            return min(int(v.version) for v in found)
        # the trainer tags each version with its run_name (= run key) when it creates it,
        # so a crash between registration and our own tags is still found here
        found = self.client.search_model_versions(
            f"name = {_quote(self.name)} and tags.run_name = {_quote(run_key)}")
        if found:
            return min(int(v.version) for v in found)
        run_ids = set(self._runs_named(run_key))
        if not run_ids:
            return None
        versions = self.client.search_model_versions(f"name = {_quote(self.name)}")
        mine = [int(v.version) for v in versions if v.run_id in run_ids]
        return min(mine) if mine else None

    def version_info(self, version: int) -> tuple[str | None, dict[str, str]]:
        mv = self.client.get_model_version(self.name, str(version))
        return mv.run_id, dict(mv.tags or {})

    def is_champion(self, version: int) -> bool:
        aliases = self.client.get_registered_model(self.name).aliases
        return str(aliases.get(self.settings.champion_alias)) == str(version)

    def record(self, version: int | None, run_id: str | None, tags: Mapping[str, Any],
               snapshot: Snapshot | None = None) -> None:
        """Tags on the version and the run; the shard listing as a run artifact (once)."""
        clean = {TAG + k: str(v)[:5000] for k, v in tags.items()}
        if run_id:
            for k, v in clean.items():
                self.client.set_tag(run_id, k, v)
            if snapshot is not None and not self._has_artifact(run_id):
                with tempfile.TemporaryDirectory(prefix="sslstream-snap-") as tmp:
                    path = Path(tmp) / Path(SNAPSHOT_ARTIFACT).name
                    path.write_text(snapshot.to_json(), encoding="utf-8")
                    self.client.log_artifact(run_id, str(path), Path(SNAPSHOT_ARTIFACT).parent.name)
        if version is not None:
            for k, v in clean.items():
                self.client.set_model_version_tag(self.name, str(version), k, v)

    def _has_artifact(self, run_id: str) -> bool:
        try:
            files = self.client.list_artifacts(run_id, str(Path(SNAPSHOT_ARTIFACT).parent))
        except (MlflowException, OSError):
            return False
        return any(f.path == SNAPSHOT_ARTIFACT for f in files)

    def record_check(self, decision: str, reason: str, snapshot: Snapshot | None) -> None:
        """A check that trained nothing: tags on the registered model (no run is created, so
        a scheduler polling every few minutes does not flood the experiment)."""
        tags = {"last_check_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "last_decision": decision, "last_reason": reason[:5000]}
        if snapshot is not None:
            tags["last_snapshot_id"] = snapshot.id
        try:
            self.client.get_registered_model(self.name)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            raise
        for k, v in tags.items():
            self.client.set_registered_model_tag(self.name, TAG + k, v)
