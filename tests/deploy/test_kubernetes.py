"""deploy/kubernetes/*.yaml and every Kubernetes manifest shown in README.md and docs/: valid
against the Kubernetes 1.37 OpenAPI schemas (kubernetes-validate, pinned; strict: an unknown
or misspelt field fails), a JobSet's own fields against its CRD schema (vendored in
tests/deploy/schemas/, source and licence noted there), and each container's command through
the config check (`--cfg`, exit 0); no cluster needed. Plus what the manifests promise:
checkpoints in the object store (no volume claim), the exit-code policy, a rendezvous that
names pod 0 of the same JobSet with as many nodes as the Job runs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.37"
JOBSET_SCHEMA = Path(__file__).with_name("schemas") / "jobset-v1alpha2.json"
LAUNCHER = ["python", "-m", "sslstream.orchestration.runtime.launch"]


def _deployed() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((REPO / "deploy" / "kubernetes").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.relative_to(REPO)}#{i}", doc))
    return out


def _documented() -> list[tuple[str, dict]]:
    """The manifests in the docs' ```yaml blocks (those with an apiVersion)."""
    out = []
    for path in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)):
            doc = yaml.safe_load(block)
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((f"{path.relative_to(REPO)}#yaml{i}", doc))
    return out


MANIFESTS = _deployed() + _documented()


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (a CRD prunes them silently; a typo in a
    manifest would then just vanish)."""
    s = copy.deepcopy(schema)

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            if "properties" in o and o.get("type") == "object":
                o.setdefault("additionalProperties", False)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(s)
    return s


def _jobs(doc: dict) -> list[tuple[str, dict]]:
    """(name, batch/v1 Job) for every Job the manifest makes: a Job, a CronJob's template, or
    each of a JobSet's replicated Jobs."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "Job":
        return [(name, doc)]
    if kind == "CronJob":
        return [(name, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                        "spec": doc["spec"]["jobTemplate"]["spec"]})]
    if kind == "JobSet":
        return [(f"{name}-{rj['name']}", {"apiVersion": "batch/v1", "kind": "Job",
                                          "metadata": {"name": f"{name}-{rj['name']}"},
                                          "spec": rj["template"]["spec"]})
                for rj in doc["spec"]["replicatedJobs"]]
    raise AssertionError(f"no rule for kind {kind}")


def validate(doc: dict) -> None:
    """Raise when `doc` breaks its schema (see the module docstring)."""
    if doc["kind"] == "JobSet":
        jsonschema.validate(doc, _strict(json.loads(JOBSET_SCHEMA.read_text())))
        for _, job in _jobs(doc):
            kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _sslstream_command(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """(torchrun options or None, the `sslstream` command and its arguments)."""
    if argv[:3] == LAUNCHER:
        rest = argv[3:]
        i = rest.index("-m")
        assert rest[i + 1] == "sslstream", argv
        return rest[:i], rest[i + 2:]
    assert argv[0] == "sslstream", argv
    return None, argv[1:]


def _containers(job: dict) -> list[dict]:
    return job["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("where,doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_is_valid_against_the_kubernetes_schemas(where, doc):
    validate(doc)


def test_the_validation_can_fail():
    """A misspelt field, a wrong type and a JobSet typo are caught (strict schemas)."""
    (_, cron), = [(w, d) for w, d in _deployed() if d["kind"] == "CronJob"]
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rule"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    (_, jobset), = [(w, d) for w, d in _deployed() if d["kind"] == "JobSet"]
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["maxRestart"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(jobset)
    pod = bad["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["imagePullPolicyy"] = "Always"  # inside the Job template
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


@pytest.mark.parametrize("where,doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_keeps_checkpoints_in_the_object_store_and_maps_exit_codes(where, doc):
    for _, job in _jobs(doc):
        spec = job["spec"]
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"  # what a podFailurePolicy needs
        assert not any("persistentVolumeClaim" in v for v in pod.get("volumes", []))
        rules = spec["podFailurePolicy"]["rules"]
        fail_on = {c for r in rules if r["action"] == "FailJob" and "onExitCodes" in r
                   for c in r["onExitCodes"]["values"]}
        assert 2 in fail_on  # a configuration error is never retried
        assert any(r["action"] == "Ignore" and r.get("onPodConditions") == [
            {"type": "DisruptionTarget"}] for r in rules)  # preemption is not a failure
        for c in _containers(job):
            torchrun, cmd = _sslstream_command([*c["command"], *c.get("args", [])])
            out = [a.split("=", 1)[1] for a in cmd if a.startswith("trainer.output_dir=")]
            assert out and out[0].startswith(("s3://", "gs://")), cmd


JOBSETS = [(w, d) for w, d in MANIFESTS if d["kind"] == "JobSet"]


@pytest.mark.parametrize("where,doc", JOBSETS, ids=[w for w, _ in JOBSETS])
def test_the_rendezvous_names_pod_0_of_the_same_jobset_and_the_node_count(where, doc):
    from sslstream.orchestration.runtime.launch import with_signals
    from torch.distributed.run import parse_args

    assert doc["spec"]["network"]["enableDNSHostnames"]
    name = doc["metadata"]["name"]
    for rj in doc["spec"]["replicatedJobs"]:
        spec = rj["template"]["spec"]
        assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
        for c in _containers({"spec": spec}):
            torchrun, cmd = _sslstream_command([*c["command"], *c.get("args", [])])
            ns = parse_args(with_signals([*torchrun, "-m", "sslstream", *cmd]))
            assert int(ns.nnodes) == spec["parallelism"]
            assert ns.rdzv_backend == "c10d"
            assert ns.rdzv_endpoint == f"{name}-{rj['name']}-0-0.{name}:29500"
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert int(ns.nproc_per_node) == gpus


def test_every_manifest_command_passes_the_config_check(capsys, monkeypatch):
    """Each container's `sslstream <command> ...` with `--cfg`: exit 0 (the config composes
    and every key, type and range holds), for the deployed files and the documented ones."""
    from sslstream.orchestration.cli import main

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    seen = set()
    for where, doc in MANIFESTS:
        for _, job in _jobs(doc):
            for c in _containers(job):
                _, cmd = _sslstream_command([*c["command"], *c.get("args", [])])
                if tuple(cmd) in seen:
                    continue
                seen.add(tuple(cmd))
                assert main([*cmd, "--cfg"]) == 0, (where, cmd, capsys.readouterr().err[-2000:])
    assert len(seen) >= 3
    assert main(["retrain", "trainer.output_dir2=x", "--cfg"]) == 2  # the check can refuse
