"""The promotion rule: when alias champion moves to a newly registered version.

The decision -- finite, not collapsed, evaluated like the champion, better by the margin --
and the read-compare-set loop that keeps it right when two registrations race; registry.py
calls it after registering a version. docs/tracking.md "Registry" states the rule for users.
"""

from __future__ import annotations

import math
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sslstream.orchestration.schema.tracking import RegistrySettings  # tracking.registry.*

__all__ = ["COMPARABLE_TAGS", "RegistrySettings", "collapse_reason", "version_of", "current_champion", "decide", "incomparable",
           "promote", "version_metric"]

# Version tags that say what an evaluation measured (orchestration/train/evalid.py): two kNN
# accuracies are compared only when both are equal (the same labelled split, the same protocol)
COMPARABLE_TAGS = ("eval.split_fingerprint", "eval.protocol")


def collapse_reason(metrics: dict[str, float], feature_dim: int,
                    settings: RegistrySettings) -> str | None:
    """Why the embeddings count as collapsed (or non-finite), None when healthy."""
    std = metrics.get(settings.std_metric)
    if settings.min_std_ratio is not None and std is not None:
        ratio = float(std) * math.sqrt(feature_dim)
        if not math.isfinite(ratio) or ratio < settings.min_std_ratio:
            return (f"collapsed: {settings.std_metric}={std:.4g} (x sqrt({feature_dim}) = "
                    f"{ratio:.3g} < {settings.min_std_ratio})")
    rank = metrics.get(settings.rank_metric)
    if settings.min_effective_rank is not None and rank is not None and (
        not math.isfinite(float(rank)) or float(rank) < settings.min_effective_rank
    ):
        return (f"collapsed: {settings.rank_metric}={rank:.4g} < "
                f"{settings.min_effective_rank}")
    return None


def version_metric(client: MlflowClient, version: Any, metric: str) -> float | None:
    """The metric recorded on a version (tag), else on its source run; None if unknown."""
    raw = (version.tags or {}).get(metric)
    if raw is not None:
        try:
            return float(raw)
        except ValueError:
            return None
    if version.run_id:
        try:
            return client.get_run(version.run_id).data.metrics.get(metric)
        except MlflowException:
            return None
    return None


def current_champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    if alias not in client.get_registered_model(name).aliases:
        return None
    return client.get_model_version_by_alias(name, alias)


PROMOTE_ATTEMPTS = 5  # read-compare-set rounds against concurrent promoters


def version_of(mv: Any | None) -> int | None:
    return None if mv is None else int(mv.version)


def promote(client: MlflowClient, version: int, new_metric: float, metrics: dict[str, float],
             feature_dim: int, settings: RegistrySettings,
             identity: dict[str, str] | None = None) -> tuple[bool, str, int | None]:
    """Move alias champion to ``version`` if the rule says so: read, compare, set, verify.

    MLflow has no conditional alias update, so two registrations racing on one model could
    each promote against the same old champion and the worse one could win. Here the rule
    is decided against the champion read just before the write (re-decided if it changed),
    and the alias is read back after the write: if another writer replaced it, the rule is
    applied again against that writer's version. Two racing promoters therefore converge on
    the better version, except when a write lands in the milliseconds between another
    promoter's last read and its write. Bounded: PROMOTE_ATTEMPTS rounds.
    """
    alias = settings.champion_alias
    champion = current_champion(client, settings.name, alias)
    promoted, reason, prev = False, "", version_of(champion)
    for _ in range(PROMOTE_ATTEMPTS):
        if version_of(champion) == version:
            return True, reason or f"{alias} already points at v{version}", prev
        promoted, reason, prev = decide(client, champion, new_metric, metrics, feature_dim,
                                         settings, identity)
        if not promoted:
            return False, reason, prev
        again = current_champion(client, settings.name, alias)
        if version_of(again) != version_of(champion):  # changed since we decided
            champion = again
            continue
        client.set_registered_model_alias(settings.name, alias, str(version))
        champion = current_champion(client, settings.name, alias)
        if version_of(champion) == version:
            return True, reason, prev
    return False, (f"{alias} kept changing under concurrent registrations; v{version} not "
                   f"promoted after {PROMOTE_ATTEMPTS} attempts (last: {reason})"), prev


def decide(client: MlflowClient, champion: Any | None, new_metric: float,
            metrics: dict[str, float], feature_dim: int,
            settings: RegistrySettings, identity: dict[str, str] | None = None
            ) -> tuple[bool, str, int | None]:
    """The promotion rule: finite, not collapsed, comparable with the champion's evaluation,
    and better than the champion + margin."""
    prev = int(champion.version) if champion is not None else None
    if not math.isfinite(new_metric):
        return False, f"{settings.metric}={new_metric} is not finite", prev
    if (collapsed := collapse_reason(metrics, feature_dim, settings)) is not None:
        return False, collapsed, prev
    if champion is None:
        return True, f"no {settings.champion_alias} yet; {settings.metric}={new_metric:.4g}", prev
    if (why := incomparable(identity, champion.tags or {}, settings)) is not None:
        return False, (f"not comparable with {settings.champion_alias} v{prev}: {why}; "
                       f"registered as {settings.challenger_alias} only "
                       f"({settings.metric}={new_metric:.4g})"), prev
    old = version_metric(client, champion, settings.metric)
    if old is None or not math.isfinite(old):
        return True, (f"{settings.champion_alias} v{prev} has no finite {settings.metric}; "
                      f"new {settings.metric}={new_metric:.4g}"), prev
    if new_metric > old + settings.margin:
        return True, (f"{settings.metric} {new_metric:.4g} beats {settings.champion_alias} "
                      f"v{prev} ({old:.4g}) by more than margin {settings.margin}"), prev
    return False, (f"{settings.metric} {new_metric:.4g} does not beat {settings.champion_alias} "
                   f"v{prev} ({old:.4g}) by more than margin {settings.margin}"), prev


def incomparable(new: dict[str, str] | None, champion_tags: dict[str, str],
                 settings: RegistrySettings) -> str | None:
    """Why the new evaluation cannot be compared with the champion's; None when it can.

    Only applies when the new version records what it measured (`COMPARABLE_TAGS`): a
    caller that records nothing keeps the plain metric comparison.
    """
    if not settings.require_comparable or not new:
        return None
    names = {"eval.split_fingerprint": "labelled split (data.bank / data.test)",
             "eval.protocol": "evaluation protocol"}
    for tag in COMPARABLE_TAGS:
        mine, theirs = new.get(tag), champion_tags.get(tag)
        if theirs is None:
            return f"its evaluation recorded no {names[tag]}"
        if mine != theirs:
            return (f"evaluated on another {names[tag]} ({tag} {_short(mine)} vs "
                    f"{_short(theirs)})")
    return None


def _short(v: str | None) -> str:
    return "none" if v is None else (v if len(v) <= 24 else v[:21] + "...")
