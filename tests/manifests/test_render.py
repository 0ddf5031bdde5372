"""Every kustomization builds offline, and every object it renders is schema-valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.manifests import manifest_support as support

SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue"}


def _subset_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """Hand-written subset schemas for kinds whose CRDs are not in this repository."""
    kueue = yaml.safe_load((SCHEMAS / "kueue-v1beta1.yaml").read_text())
    validators = {
        ("kueue.x-k8s.io/v1beta1", kind): jsonschema.Draft7Validator(
            {**kueue[kind], "definitions": kueue["definitions"]}
        )
        for kind in KUEUE_KINDS
    }
    application = yaml.safe_load((SCHEMAS / "argocd-application.yaml").read_text())
    validators[("argoproj.io/v1alpha1", "Application")] = jsonschema.Draft7Validator(application)
    return validators


def validate_all(objs: list[dict[str, Any]]) -> list[str]:
    """Problems of each object: built-in kinds against Kubernetes' own schemas (strict:
    unknown fields fail), custom resources against the CRDs rendered with them, Kueue and
    Argo CD kinds against the subset schemas. A kind none of them knows is a problem too."""
    crds = support.crd_validators(objs)
    subsets = _subset_validators()
    problems = []
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        validator = crds.get(key) or subsets.get(key)
        if validator is not None:
            problems += [
                f"{support.ident(obj)}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(obj)
            ]
            continue
        try:
            kubernetes_validate.validate(obj, support.K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{support.ident(obj)}: no schema for {key}")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{support.ident(obj)}: {'.'.join(map(str, e.path))}: {e.message}")
    return problems


@pytest.mark.parametrize("root", sorted(support.ROOTS))
def test_kustomization_builds_and_validates(
    root: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[root]
    assert objs, f"{root} rendered nothing"
    assert validate_all(objs) == []


def test_validation_catches_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validators above are not vacuous: each kind of mistake is reported."""
    objs = rendered["gpu"]
    deployment = copy.deepcopy(
        support.find(objs, "Deployment", "whisperx-gateway", "whisperx-system")
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    queue = copy.deepcopy(support.find(objs, "ClusterQueue", "whisperx"))
    queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]["nominalQuota"] = "lots"
    peering = copy.deepcopy(support.find(objs, "ClusterKopfPeering", "whisperx"))
    peering["status"] = "not an object"
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    problems = validate_all([*crds, deployment, queue, peering, unknown])
    assert len(problems) == 4, problems
    assert "securityContxt" in problems[0]
    assert "nominalQuota" in problems[1]
    assert "status" in problems[2]
    assert "no schema" in problems[3]


@pytest.mark.parametrize("root", ["base", *sorted(support.OVERLAYS)])
def test_rendered_crd_is_the_generated_one(
    root: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """The CRD comes from crds/ unchanged except for Argo CD's sync annotations."""
    generated = yaml.safe_load(support.CRD_FILE.read_text())
    crd = support.find(rendered[root], "CustomResourceDefinition", "predictions.whisperx.io")
    annotations = crd["metadata"].pop("annotations")
    assert annotations == {
        "argocd.argoproj.io/sync-wave": "-1",
        "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
    }
    assert crd == generated


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_crds_are_structural(root: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    crds = [o for o in rendered[root] if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        "predictions.whisperx.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    for crd in crds:
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            assert support.structural_schema_problems(schema) == [], support.ident(crd)
        assert sum(v["storage"] for v in crd["spec"]["versions"]) == 1


def test_structural_check_catches_untyped_nodes() -> None:
    schema = {"type": "object", "properties": {"a": {"properties": {"b": {"$ref": "#/x"}}}}}
    assert support.structural_schema_problems(schema) == [
        ".a: no type",
        ".a.b: $ref is not allowed",
        ".a.b: no type",
    ]


def test_example_prediction_is_valid() -> None:
    validator = support.prediction_validator()
    examples = list((support.MANIFESTS / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "Prediction"
            assert doc["metadata"]["namespace"] == support.TENANT_NS
            assert list(validator.iter_errors(doc)) == [], path
            broken = copy.deepcopy(doc)
            broken["spec"]["input"]["batch_size"] = 0
            assert list(validator.iter_errors(broken)), "the CRD schema must refuse this"


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_namespaces_exist_and_names_are_unique(
    root: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[root]
    created = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    assert created == {support.CONTROL_NS, support.TENANT_NS}
    cluster_scoped = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterKopfPeering",
        "ResourceFlavor",
        "ClusterQueue",
        "FlowSchema",
        "PriorityLevelConfiguration",
    }
    seen = set()
    for obj in objs:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in cluster_scoped:
            assert ns is None, support.ident(obj)
        else:
            assert ns in created, f"{support.ident(obj)} is not in a namespace of the overlay"
        key = (obj["kind"], ns, obj["metadata"]["name"])
        assert key not in seen, f"{support.ident(obj)} twice"
        seen.add(key)


@pytest.mark.parametrize("root", sorted(support.OVERLAYS))
def test_argo_cd_applies_crds_first(root: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    def wave(obj: dict[str, Any]) -> int:
        annotations = obj["metadata"].get("annotations", {})
        return int(annotations.get("argocd.argoproj.io/sync-wave", "0"))

    objs = rendered[root]
    crd_waves = {wave(o) for o in objs if o["kind"] == "CustomResourceDefinition"}
    other_waves = {wave(o) for o in objs if o["kind"] != "CustomResourceDefinition"}
    assert max(crd_waves) < min(other_waves)
