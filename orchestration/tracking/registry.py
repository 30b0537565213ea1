"""Encoders in the MLflow Model Registry: log, register, promote, read back.

Public API (all take the tracking URI explicitly; the registry follows it):

- ``log_encoder(uri, run_id, backbone, spec) -> str``: log the backbone as a pyfunc model
  (models-from-code, ``orchestration/tracking/encoder_model.py``) in run ``run_id``; returns the
  logged model's URI ``models:/m-<id>``.
- ``register_encoder(uri, model_uri, settings, metrics=..., feature_dim=..., tags=...)``
  -> ``PromotionDecision``: new registry version with tags, alias ``challenger`` on it, and
  alias ``champion`` moved to it only when it beats the current champion by the margin and
  is not collapsed. Any registry failure raises ``RegistrationError``.
- ``read_champion(uri, name) -> ChampionInfo | None`` for the retraining job.
- The promotion rule itself (when alias champion moves): ``promotion.py``.
- ``load_encoder_state_dict(uri, model_uri) -> (state_dict, EncoderSpec)`` for warm starts.

Aliases are read with ``get_model_version_by_alias`` / ``get_registered_model().aliases``:
``search_model_versions`` returns empty aliases (mlflow #9783).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec
from sslstream.models.backbones import requirements as backbone_requirements
from sslstream.orchestration.errors import (  # re-exported: callers import it
    RegistrationError,
    UserError,
)
from sslstream.orchestration.tracking.encoder_model import (
    CODE_MODULE,
    INPUT_CONTRACT,
    EncoderSpec,
    load_weights,
)
from sslstream.orchestration.tracking.mlflow_env import (
    ensure_http_limits,
    quiet_downloads,
    require_store,
    scoped_tracking_uri,
)
from sslstream.orchestration.tracking.promotion import (  # COMPARABLE_TAGS, RegistrySettings: re-exported
    COMPARABLE_TAGS,
    RegistrySettings,
    current_champion,
    promote,
    version_metric,
    version_of,
)
from sslstream.pipelines.shards.masking import mask

ENCODER_CODE = Path(__file__).with_name("encoder_model.py")
# The backbone code shipped with every encoder (encoder_model.py: `import_code`).
BACKBONE_CODE = Path(__file__).resolve().parents[2] / "models" / "backbones.py"
SPEC_FILE = "encoder_spec.json"
WEIGHTS_FILE = "encoder_weights.pt"


@dataclass(frozen=True)
class PromotionDecision:
    name: str
    version: int
    uri: str                           # models:/<name>/<version>
    promoted: bool                     # True: alias champion now points at this version
    reason: str
    metric: float
    previous_champion: int | None = None


@dataclass(frozen=True)
class ChampionInfo:
    name: str
    version: int
    uri: str
    metric: float | None               # the settings.metric recorded for that version
    tags: dict[str, str]
    run_id: str | None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the source tree, best effort (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _signature(spec: EncoderSpec) -> ModelSignature:
    """Outputs and params only: the pyfunc checks its inputs itself (encoder_model.py, "Why
    no input schema"); `_metadata` describes them."""
    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.feature_dim), name="embeddings")]),
        params=ParamSchema([ParamSpec("batch_size", "long", 256), ParamSpec("device", "string", "cpu")]),
    )


def _requirements(spec: EncoderSpec) -> list[str]:
    """The serving environment: this process's versions of mlflow, torch, torchvision, numpy,
    pillow (encoded image files) and of what the backbone's code imports besides (timm for a
    ViT: backbones.requirements)."""
    import torchvision

    def base(v: str) -> str:
        return v.split("+")[0]

    extra = [f"{pkg}=={importlib.metadata.version(pkg)}"
             for pkg in backbone_requirements(spec.backbone)]
    return [f"mlflow=={mlflow.__version__}", f"torch=={base(torch.__version__)}",
            f"torchvision=={base(torchvision.__version__)}", f"numpy=={np.__version__}",
            f"pillow=={importlib.metadata.version('pillow')}", *extra]


def log_encoder(uri: str, run_id: str, backbone: torch.nn.Module, spec: EncoderSpec,
                *, name: str = "encoder") -> str:
    """Log ``backbone`` (weights + spec + the pyfunc code) in run ``run_id``.

    The backbone code is shipped as an artifact (``code``), so a serving process rebuilds
    the backbone with the code that trained it, under a private module name
    (encoder_model.py: ``import_code``). Raises ``RegistrationError`` on failure.
    """
    ensure_http_limits(uri)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    example = np.zeros((1, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="sslstream-encoder-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / SPEC_FILE).write_text(spec.to_json(), encoding="utf-8")
        torch.save(state, tmp_path / WEIGHTS_FILE)
        code_dir = tmp_path / "code"
        code_dir.mkdir()
        shutil.copyfile(BACKBONE_CODE, code_dir / f"{CODE_MODULE}.py")
        try:
            client = MlflowClient(tracking_uri=uri)
            # Created here so the model lands in the run's experiment (Model.log would use the
            # process-global experiment) and does not copy hundreds of run params.
            logged = client.create_logged_model(
                experiment_id=client.get_run(run_id).info.experiment_id, name=name,
                source_run_id=run_id)
            with scoped_tracking_uri(uri):
                info = Model.log(
                    artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                    model_id=logged.model_id,
                    python_model=str(ENCODER_CODE),
                    artifacts={"spec": str(tmp_path / SPEC_FILE),
                               "weights": str(tmp_path / WEIGHTS_FILE),
                               "code": str(code_dir)},
                    signature=_signature(spec), input_example=example,
                    metadata={"sslstream_inputs": INPUT_CONTRACT,
                              "image_size": spec.image_size, "feature_dim": spec.feature_dim},
                    pip_requirements=_requirements(spec),
                )
        except Exception as e:  # MLflow raises many types (HTTP, IO, schema)
            raise RegistrationError(
                f"logging encoder {name!r} to run {run_id} at {mask(uri)} failed: "
                f"{mask(str(e))}"
            ) from e
    return info.model_uri


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def register_encoder(uri: str, model_uri: str, settings: RegistrySettings, *,
                     metrics: dict[str, float], feature_dim: int,
                     run_id: str | None = None,
                     tags: dict[str, str] | None = None,
                     evaluated: bool = True) -> PromotionDecision:
    """Register ``model_uri`` as a new version of ``settings.name`` and apply the aliases.

    ``metrics`` must hold ``settings.metric`` and should hold the collapse metrics
    (``settings.std_metric``, ``settings.rank_metric``). All metrics become version tags,
    next to ``tags`` (method, data manifest hash, ...) and the git commit.
    ``evaluated=False`` (a run on unlabelled data: no kNN exists) registers the version as
    a challenger with tag ``evaluated=false`` and never promotes it; the champion is untouched.
    """
    name = settings.name
    if evaluated and settings.metric not in metrics:
        raise RegistrationError(
            f"cannot register {name!r}: metrics lack the promotion metric "
            f"tracking.registry.metric={settings.metric!r} (got {sorted(metrics)})"
        )
    new_metric = float(metrics[settings.metric]) if evaluated else math.nan
    version_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    version_tags.update({k: repr(float(v)) for k, v in metrics.items()})
    version_tags["feature_dim"] = str(feature_dim)
    version_tags["evaluated"] = str(evaluated).lower()
    if (commit := git_commit()) is not None:
        version_tags.setdefault("git_commit", commit)
    ensure_http_limits(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version: int | None = None
    try:
        _ensure_registered_model(client, name)
        mv = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags=version_tags,
            await_creation_for=settings.await_ready_s,
            model_id=model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None,
        )
        version = int(mv.version)
        client.set_registered_model_alias(name, settings.challenger_alias, str(version))
        if evaluated:
            identity = {k: version_tags[k] for k in COMPARABLE_TAGS if k in version_tags}
            promoted, reason, prev = promote(client, version, new_metric, metrics, feature_dim,
                                             settings, identity)
        else:
            promoted = False
            prev = version_of(current_champion(client, name, settings.champion_alias))
            reason = ("not evaluated: the run had no labelled split, so there is no "
                      f"{settings.metric} to compare; {settings.champion_alias} unchanged")
        client.set_model_version_tag(name, str(version), "promoted", str(promoted).lower())
        client.set_model_version_tag(name, str(version), "promotion_reason", reason[:5000])
    except Exception as e:  # MLflow raises MlflowException, requests and OS errors
        done = "" if version is None else f" (version {version} was created; aliases/tags incomplete)"
        raise RegistrationError(
            f"registering model {name!r} from {model_uri} at {mask(uri)} failed{done}: "
            f"{mask(str(e))}"
        ) from e
    return PromotionDecision(name=name, version=version, uri=f"models:/{name}/{version}",
                             promoted=promoted, reason=reason, metric=new_metric,
                             previous_champion=prev)


def read_champion(uri: str, name: str, *, alias: str = "champion",
                  metric: str = RegistrySettings.metric) -> ChampionInfo | None:
    """The version behind ``models:/<name>@<alias>``; None if the model or alias is absent."""
    ensure_http_limits(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        version = current_champion(client, name, alias)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if version is None:
        return None
    return ChampionInfo(name=name, version=int(version.version),
                        uri=f"models:/{name}/{version.version}",
                        metric=version_metric(client, version, metric),
                        tags=dict(version.tags or {}), run_id=version.run_id)


class ModelNotFound(UserError, LookupError):
    """A models:/ URI that the tracking store does not hold (a typo, or another store)."""


def load_encoder_state_dict(uri: str, model_uri: str) -> tuple[dict[str, torch.Tensor], EncoderSpec]:
    """Weights and spec of a logged/registered encoder (``models:/name@champion``, ...).

    Reads only tensors (``weights_only=True``); use it to warm-start a backbone built from
    the returned spec's ``backbone`` config. A local store that does not exist is an error
    (``StoreNotFound``), never created.
    """
    require_store(uri, model_uri)
    ensure_http_limits(uri)
    with tempfile.TemporaryDirectory(prefix="sslstream-warm-") as tmp:
        # models:/ URIs resolve through the process-global registry URI, whatever the
        # registry_uri argument says: scope it.
        try:
            with scoped_tracking_uri(uri), quiet_downloads():
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=tmp, tracking_uri=uri, registry_uri=uri))
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            raise ModelNotFound(
                f"{model_uri} is not in the MLflow store at {mask(uri)} ({mask(str(e))}); "
                "if it was registered elsewhere, set MLFLOW_TRACKING_URI to the store its "
                "training printed") from e
        conf = Model.load(str(local)).flavors["python_function"]
        paths = {k: local / (v["path"] if isinstance(v, dict) else v)
                 for k, v in conf.get("artifacts", {}).items()}
        if "spec" not in paths or "weights" not in paths:
            raise ValueError(f"{model_uri} at {mask(uri)} is not an sslstream encoder (artifacts: "
                             f"{json.dumps(sorted(paths))})")
        spec = EncoderSpec.from_json(paths["spec"].read_text(encoding="utf-8"))
        return load_weights(str(paths["weights"])), spec


def resolve_version(uri: str, model_uri: str) -> str:
    """``models:/<name>@<alias>`` -> ``models:/<name>/<version>`` (the version the alias
    points at now); any other URI is returned as it is. Names what produced an output."""
    rest = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    name, at, alias = rest.partition("@")
    if not at or "/" in name:
        return model_uri
    ensure_http_limits(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
    except MlflowException as e:
        raise ModelNotFound(f"{model_uri} is not in the MLflow store at {mask(uri)} "
                            f"({mask(str(e))})") from e
