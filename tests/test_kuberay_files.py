"""The Kubernetes, compose and image files under cluster/, checked offline.

The KubeRay manifests are validated against compact JSON schemas of the ray.io/v1 fields
that KubeRay requires, written here in the project's words, plus the rules this project
adds: GPUs only on workers, one shared ReadWriteMany volume at one path on every pod,
nothing published beyond the cluster or the host's loopback, no literal secrets, and
image versions in step with the installed Ray and MLflow.

Where the required fields come from: ray-project/kuberay,
``ray-operator/apis/ray/v1/raycluster_types.go`` as of KubeRay v1.7.0 (a field is required
when its json tag has no ``omitempty`` and it has no ``+optional`` marker); the RayJob
fields and submission modes from the v1.7.0 API reference (``docs/reference/api.md``).
The generated CRD ``helm-chart/kuberay-operator/crds/ray.io_raycronjobs.yaml`` (commit
5d68142f, an earlier 1.x, controller-gen v0.16.5), whose embedded RayJob spec carries the
RayCluster spec, lists the same: ``rayClusterSpec`` requires ``headGroupSpec``;
``headGroupSpec`` requires ``template``; each worker group requires ``groupName``,
``minReplicas``, ``maxReplicas`` and ``template``; a Pod spec requires ``containers``; a
container requires ``name``; a volume ``name``; a volume mount ``name`` and ``mountPath``;
an env entry ``name``. RayJobSpec requires nothing; this project requires ``entrypoint``
and ``rayClusterSpec`` (a job brings its own cluster). ``submitterPodTemplate`` (RayJobSpec)
is a Kubernetes PodTemplateSpec and ``autoscalerOptions.env`` an EnvVar list (same API
reference); a Job's pods take restartPolicy ``Never`` or ``OnFailure`` only.

Token authentication (Ray >= 2.52): ``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN``
on every Ray container, from the Secret ``ray-auth-token``. Its key is ``auth_token``, the key
KubeRay's own ``authOptions.secretName`` expects, so the same Secret serves either way. KubeRay
gives the autoscaler container (its own container in the head pod) and the RayJob submitter
the auth variables only when ``authOptions`` is set (``ray-operator/controllers/ray/common/pod.go``,
``DefaultHeadPodTemplate``; ``rayjob_controller.go``, ``configureSubmitterContainer``), so the
manifests give them ``autoscalerOptions.env`` and a ``submitterPodTemplate``; KubeRay fills in
the submitter's ``ray job submit`` command when the template's container has none.
Older KubeRay releases (before ``rayStartParams`` became optional) also required
``rayStartParams`` and ``replicas``; the manifests set both, so they work there too.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
STORAGE = CLUSTER / "kuberay" / "storage.yaml"
MLFLOW_K8S = CLUSTER / "mlflow" / "mlflow-k8s.yaml"
COMPOSE = CLUSTER / "mlflow" / "docker-compose.yaml"
K8S_FILES = (STORAGE, RAYCLUSTER, RAYJOB, MLFLOW_K8S)

SHARED_CLAIM = "ipb-shared"
SHARED_MOUNT = "/mnt/ipb"
GPU = "nvidia.com/gpu"
# data_cpus the RAY_num_workers_soft_limit values are sized for (cluster/README.md)
DATA_CPUS = 0.25
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
# Ray token authentication: the Secret (made from ~/.ray/auth_token, README) and its key
AUTH_SECRET = "ray-auth-token"
AUTH_SECRET_KEY = "auth_token"
JOB_RESTART_POLICIES = ("Never", "OnFailure")
URI_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>[^@]+)@")

# --- schemas of the ray.io/v1 fields (see the module docstring for their source) ------

_STRING = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
# a Kubernetes quantity: a number with an optional unit (500m, 4, 16Gi, 1e3)
_QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0},
                       {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([mkMGTPE]|[KMGTPE]i|[eE][0-9]+)?$"}]}
_QUANTITIES = {"type": "object", "additionalProperties": _QUANTITY}
# rayStartParams: every value a string (`num-cpus: 0` unquoted is an error)
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}

_ENV_ENTRY = {
    "type": "object", "required": ["name"],
    "properties": {
        "name": _STRING, "value": _STRING,
        "valueFrom": {"type": "object", "properties": {
            "secretKeyRef": {"type": "object", "required": ["key"],
                             "properties": {"name": _STRING, "key": _STRING, "optional": _BOOL}},
            "configMapKeyRef": {"type": "object", "required": ["key"]},
            "fieldRef": {"type": "object", "required": ["fieldPath"]}}}}}
_CONTAINER = {
    "type": "object", "required": ["name"],
    "properties": {
        "name": _STRING, "image": _STRING,
        "env": {"type": "array", "items": _ENV_ENTRY},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": _INT32, "name": _STRING}}},
        "resources": {"type": "object", "properties": {"limits": _QUANTITIES, "requests": _QUANTITIES}},
        "volumeMounts": {"type": "array", "items": {
            "type": "object", "required": ["name", "mountPath"],
            "properties": {"name": _STRING, "mountPath": _STRING, "readOnly": _BOOL}}}}}
_POD_TEMPLATE = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {"type": "object", "required": ["containers"], "properties": {
            "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
            "containers": {"type": "array", "items": _CONTAINER},
            "volumes": {"type": "array", "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": _STRING, "persistentVolumeClaim": {
                    "type": "object", "required": ["claimName"],
                    "properties": {"claimName": _STRING, "readOnly": _BOOL}}}}}}}}}
_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": _STRING,
        "enableInTreeAutoscaling": _BOOL,
        "autoscalerOptions": {"type": "object", "properties": {
            "idleTimeoutSeconds": _INT32,
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "env": {"type": "array", "items": _ENV_ENTRY}}},
        "headGroupSpec": {"type": "object", "required": ["template"], "properties": {
            "serviceType": _STRING, "enableIngress": _BOOL, "rayStartParams": _STRING_MAP,
            "template": _POD_TEMPLATE}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "required": ["groupName", "maxReplicas", "minReplicas", "template"],
            "properties": {
                "groupName": _STRING, "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
                "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}}}}}
_JOB_SPEC = {
    "type": "object", "required": ["entrypoint", "rayClusterSpec"],  # project rule, see docstring
    "properties": {
        "entrypoint": _STRING,
        "runtimeEnvYAML": _STRING,
        "shutdownAfterJobFinishes": _BOOL,
        "ttlSecondsAfterFinished": _INT32,
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},  # "must be positive"
        "backoffLimit": _INT32,
        # the modes KubeRay v1.7.0 knows (JobSubmissionMode)
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterPodTemplate": _POD_TEMPLATE,
        "rayClusterSpec": _CLUSTER_SPEC}}


def _resource_schema(kind: str, spec: dict) -> dict:
    """apiVersion, kind and metadata.name are what Kubernetes needs of any object."""
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["name"]}, "spec": spec}}


SCHEMAS = {"RayCluster": _resource_schema("RayCluster", _CLUSTER_SPEC),
           "RayJob": _resource_schema("RayJob", _JOB_SPEC)}


def problems(doc: dict) -> list[str]:
    """Every schema violation of a ray.io document, as 'field.path: message'."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMAS[doc.get("kind")])
    out = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        out.append(f"{where.lstrip('.') or '(top)'}: {error.message}")
    return out


# --- reading the files ----------------------------------------------------------------

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec): the long-running cluster and the RayJob's own."""
    return [(RAYCLUSTER.name, _one(RAYCLUSTER, "RayCluster")["spec"]),
            (RAYJOB.name, _one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"])]


def _cluster_spec_of(doc: dict) -> dict | None:
    """The RayCluster spec inside a RayCluster or RayJob document (None for other kinds)."""
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    return None


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]


def _ray_container(pod: dict) -> dict:
    return pod["containers"][0]  # KubeRay runs Ray in the first container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _env_lists(node, where: str = ""):
    """(where, env entry) for every entry of every `env:` list in a document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from ((f"{where}.env", e) for e in value)
            else:
                yield from _env_lists(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _env_lists(value, f"{where}[{i}]")


def literal_secrets(doc: dict) -> list[str]:
    """Env entries that carry a secret as a literal value: a name like *PASSWORD*,
    *SECRET*, *TOKEN* or *KEY* without valueFrom.secretKeyRef, or a URI with a password."""
    bad = []
    for where, entry in _env_lists(doc):
        if SECRET_NAME.search(entry.get("name", "")) and "secretKeyRef" not in entry.get("valueFrom", {}):
            bad.append(f"{where}: {entry['name']} must come from valueFrom.secretKeyRef")
        if URI_PASSWORD.search(str(entry.get("value", ""))):
            bad.append(f"{where}: {entry['name']} holds a password in a URI; put the URI in a Secret")
    return bad


def _token_env_holders(doc: dict) -> list[tuple[str, dict]]:
    """(where, container) for everything that talks to Ray in a RayCluster or RayJob: the
    Ray container of the head and of each worker group, the autoscaler (its env from
    autoscalerOptions) and, for a RayJob, the submitter (first container of its template)."""
    spec = _cluster_spec_of(doc)
    holders = [(group, _ray_container(pod)) for group, pod in _groups(spec)]
    if spec.get("enableInTreeAutoscaling"):
        holders.append(("autoscaler", {"env": spec.get("autoscalerOptions", {}).get("env", [])}))
    if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
        template = doc["spec"].get("submitterPodTemplate") or {"spec": {"containers": [{}]}}
        holders.append(("submitter", template["spec"]["containers"][0]))
    return holders


def token_auth_problems(doc: dict) -> list[str]:
    """Where token authentication is missing: RAY_AUTH_MODE must be 'token' and RAY_AUTH_TOKEN
    must come from the Secret AUTH_SECRET (key AUTH_SECRET_KEY), never as a literal value."""
    bad = []
    for where, container in _token_env_holders(doc):
        env = _env(container)
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            bad.append(f"{where}: RAY_AUTH_MODE must be 'token'")
        token = env.get("RAY_AUTH_TOKEN", {})
        ref = token.get("valueFrom", {}).get("secretKeyRef", {})
        if "value" in token or (ref.get("name"), ref.get("key")) != (AUTH_SECRET, AUTH_SECRET_KEY):
            bad.append(f"{where}: RAY_AUTH_TOKEN must come from secretKeyRef {AUTH_SECRET}/{AUTH_SECRET_KEY}")
    return bad


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _image_tag(text: str, image: str) -> str:
    """The tag after `image:` in a Dockerfile FROM/ARG line."""
    found = re.search(rf"{re.escape(image)}:(\S+)", text)
    assert found, f"no {image}:TAG in the Dockerfile"
    return found.group(1)


# --- the KubeRay manifests against the schemas -----------------------------------------

@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")],
                         ids=["raycluster", "rayjob"])
def test_manifest_passes_the_kuberay_schema(path, kind):
    assert problems(_one(path, kind)) == []


def _drop_head_template(doc):
    del doc["spec"]["headGroupSpec"]["template"]


def _drop_group_name(doc):
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]


def _drop_container_name(doc):
    del doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["name"]


def _unquoted_start_param(doc):
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _job_without_cluster_head(doc):
    del doc["spec"]["rayClusterSpec"]["headGroupSpec"]


def _job_shutdown_as_text(doc):
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"


def _job_unknown_mode(doc):
    doc["spec"]["submissionMode"] = "K8sJob"


def _job_submitter_without_containers(doc):
    del doc["spec"]["submitterPodTemplate"]["spec"]["containers"]


def _job_submitter_restarts_always(doc):
    doc["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = "Sometimes"


@pytest.mark.parametrize("path,kind,breakage,field,expected", [
    (RAYCLUSTER, "RayCluster", _drop_head_template, "spec.headGroupSpec", "'template' is a required"),
    (RAYCLUSTER, "RayCluster", _drop_group_name, "spec.workerGroupSpecs[0]", "'groupName' is a required"),
    (RAYCLUSTER, "RayCluster", _drop_container_name, "spec.workerGroupSpecs[0].template.spec.containers[0]",
     "'name' is a required"),
    (RAYCLUSTER, "RayCluster", _unquoted_start_param, "spec.headGroupSpec.rayStartParams.num-cpus",
     "is not of type 'string'"),
    (RAYJOB, "RayJob", _job_without_cluster_head, "spec.rayClusterSpec", "'headGroupSpec' is a required"),
    (RAYJOB, "RayJob", _job_shutdown_as_text, "spec.shutdownAfterJobFinishes", "is not of type 'boolean'"),
    (RAYJOB, "RayJob", _job_unknown_mode, "spec.submissionMode", "is not one of"),
    (RAYJOB, "RayJob", _job_submitter_without_containers, "spec.submitterPodTemplate.spec",
     "'containers' is a required"),
    (RAYJOB, "RayJob", _job_submitter_restarts_always, "spec.submitterPodTemplate.spec.restartPolicy",
     "is not one of"),
], ids=["head-template", "group-name", "container-name", "start-param-type", "job-head", "job-shutdown",
        "job-mode", "submitter-containers", "submitter-restart"])
def test_schema_names_the_broken_field(path, kind, breakage, field, expected):
    doc = copy.deepcopy(_one(path, kind))
    breakage(doc)
    found = problems(doc)
    assert any(p.startswith(f"{field}:") and expected in p for p in found), found


# --- this project's rules for the clusters -------------------------------------------

@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=["raycluster", "rayjob"])
def test_gpus_only_on_autoscaling_workers_and_the_head_keeps_its_cpus(where, spec):
    head = _ray_container(spec["headGroupSpec"]["template"]["spec"])
    for part in ("requests", "limits"):
        assert GPU not in head.get("resources", {}).get(part, {}), f"{where}: the head asks for a GPU"
    assert spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0", \
        f"{where}: the head runs data tasks; do not set num-cpus: '0'"
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: the GPU group scales from zero"
    workers = spec["workerGroupSpecs"]
    assert workers, f"{where}: no worker group"
    for group in workers:
        limits = _ray_container(group["template"]["spec"])["resources"]["limits"]
        assert int(limits.get(GPU, 0)) == 1, f"{where}: {group['groupName']} workers need {GPU}: 1 in limits"
        assert group["minReplicas"] == 0 < group["maxReplicas"], f"{where}: {group['groupName']} scales 0..max"


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=["raycluster", "rayjob"])
def test_every_pod_mounts_the_shared_claim_at_the_same_path(where, spec):
    for group, pod in _groups(spec):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {(claims[m["name"]], m["mountPath"])
                  for m in _ray_container(pod).get("volumeMounts", []) if m["name"] in claims}
        assert mounts == {(SHARED_CLAIM, SHARED_MOUNT)}, f"{where}: {group} mounts {mounts}"


def test_the_shared_claim_is_read_write_many_in_the_clusters_namespace():
    claim = _one(STORAGE, "PersistentVolumeClaim")
    # in a file of its own: deleting a cluster (kubectl delete -f) never deletes the data
    assert not [d for p in (RAYCLUSTER, RAYJOB) for d in _docs(p) if d["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == SHARED_CLAIM
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "head and workers on many nodes share it"
    for path, kind in ((RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")):
        assert _one(path, kind)["metadata"]["namespace"] == claim["metadata"]["namespace"], path.name


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=["raycluster", "rayjob"])
def test_warm_worker_limit_follows_each_pods_cpus(where, spec):
    from ipb_ray.distributed.ray_setup import worker_soft_limit

    for group, pod in _groups(spec):
        container = _ray_container(pod)
        cpus = int(container["resources"]["limits"]["cpu"])
        soft_limit = _env(container)["RAY_num_workers_soft_limit"]["value"]
        assert int(soft_limit) == worker_soft_limit(cpus, DATA_CPUS), f"{where}: {group} with {cpus} CPUs"


def test_nothing_is_published_beyond_the_cluster():
    services = []
    for path in K8S_FILES:
        for doc in _docs(path):
            assert doc["kind"] not in ("Ingress", "Gateway"), f"{path.name}: {doc['kind']}"
            if doc["kind"] == "Service":
                services.append(doc)
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: {doc['metadata']}"
            spec = _cluster_spec_of(doc)
            if spec is None:
                continue
            head = spec["headGroupSpec"]
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path.name}: the head service"
            assert not head.get("enableIngress"), f"{path.name}: an ingress for the head"
            for group, pod in _groups(spec):
                assert not pod.get("hostNetwork"), f"{path.name}: {group} on the host network"
                ports = [p for c in pod["containers"] for p in c.get("ports", [])]
                assert not [p for p in ports if "hostPort" in p], f"{path.name}: {group} uses a hostPort"
    assert [s["metadata"]["name"] for s in services] == ["mlflow"]


def test_no_literal_secrets_in_the_manifests():
    for path in K8S_FILES:
        for doc in _docs(path):
            assert literal_secrets(doc) == [], path.name
    deployment = _one(MLFLOW_K8S, "Deployment")
    uri = _env(deployment["spec"]["template"]["spec"]["containers"][0])["MLFLOW_BACKEND_STORE_URI"]
    assert "value" not in uri and uri["valueFrom"]["secretKeyRef"]["name"]


def test_the_secret_check_catches_literal_values():
    doc = copy.deepcopy(_one(RAYCLUSTER, "RayCluster"))
    env = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})
    env.append({"name": "DB_URI", "value": "postgresql://mlflow:hunter2@db:5432/mlflow"})
    found = literal_secrets(doc)
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in found), found
    assert any("DB_URI" in p and "URI" in p for p in found), found


# --- Ray token authentication ----------------------------------------------------------------

@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")],
                         ids=["raycluster", "rayjob"])
def test_every_ray_container_uses_token_auth_from_the_secret(path, kind):
    doc = _one(path, kind)
    assert token_auth_problems(doc) == []
    places = [where for where, _ in _token_env_holders(doc)]
    expected = ["head", "gpu", "autoscaler"] + (["submitter"] if kind == "RayJob" else [])
    assert places == expected, places
    # the Secret lives in the cluster's namespace (secretKeyRef has none of its own) and is
    # made from a file with kubectl (README), never defined in a manifest here
    assert doc["metadata"]["namespace"] == "ipb"
    assert not [d for p in K8S_FILES for d in _docs(p) if d["kind"] == "Secret"]


def test_rayjob_submitter_gets_the_token_and_leaves_the_command_to_kuberay():
    spec = _one(RAYJOB, "RayJob")["spec"]
    template = spec["submitterPodTemplate"]
    container = template["spec"]["containers"][0]  # KubeRay: the first container submits
    assert "command" not in container and "args" not in container, \
        "without a command KubeRay fills in `ray job submit ... -- <entrypoint>` itself"
    head = _ray_container(spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"])
    assert container["image"] == head["image"], "the submitter runs the head's Ray (as KubeRay's default)"
    assert template["spec"]["restartPolicy"] in JOB_RESTART_POLICIES
    assert GPU not in container.get("resources", {}).get("limits", {})


def _literal_worker_token(doc):
    env = _cluster_spec_of(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    for entry in env:
        if entry["name"] == "RAY_AUTH_TOKEN":
            entry.pop("valueFrom")
            entry["value"] = "0123456789abcdef" * 4  # the shape of a Ray token (token_hex(32))


def _head_auth_disabled(doc):
    env = _cluster_spec_of(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "RAY_AUTH_MODE")["value"] = "disabled"


def _worker_without_auth_mode(doc):
    container = _cluster_spec_of(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "RAY_AUTH_MODE"]


def _autoscaler_without_token(doc):
    del _cluster_spec_of(doc)["autoscalerOptions"]["env"]


def _head_token_from_another_secret(doc):
    env = _cluster_spec_of(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]["name"] = "other"


def _submitter_without_template(doc):
    del doc["spec"]["submitterPodTemplate"]


@pytest.mark.parametrize("path,kind,breakage,where,literal", [
    (RAYCLUSTER, "RayCluster", _literal_worker_token, "gpu: RAY_AUTH_TOKEN", True),
    (RAYJOB, "RayJob", _literal_worker_token, "gpu: RAY_AUTH_TOKEN", True),
    (RAYCLUSTER, "RayCluster", _head_auth_disabled, "head: RAY_AUTH_MODE", False),
    (RAYCLUSTER, "RayCluster", _worker_without_auth_mode, "gpu: RAY_AUTH_MODE", False),
    (RAYCLUSTER, "RayCluster", _autoscaler_without_token, "autoscaler: RAY_AUTH_MODE", False),
    (RAYCLUSTER, "RayCluster", _head_token_from_another_secret, "head: RAY_AUTH_TOKEN", False),
    (RAYJOB, "RayJob", _submitter_without_template, "submitter: RAY_AUTH_TOKEN", False),
], ids=["literal-token", "job-literal-token", "mode-disabled", "no-mode", "autoscaler", "other-secret",
        "no-submitter-template"])
def test_token_auth_check_catches_broken_copies(path, kind, breakage, where, literal):
    doc = copy.deepcopy(_one(path, kind))
    breakage(doc)
    found = token_auth_problems(doc)
    assert any(p.startswith(where) for p in found), found
    # a literal token is also a literal secret (the check every manifest passes)
    secrets = literal_secrets(doc)
    assert any("RAY_AUTH_TOKEN" in p for p in secrets) == literal, secrets


# --- the RayJob's command ---------------------------------------------------------------

def test_rayjob_runs_cv_with_shared_storage_and_the_clusters_mlflow():
    spec = _one(RAYJOB, "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.cv"], argv
    overrides = dict(a.split("=", 1) for a in argv[3:] if "=" in a and not a.startswith("-"))
    uri = overrides["tracking.tracking_uri"]
    assert uri.startswith("http://") or uri.startswith("https://"), "a tracking server, not a local file"
    for key in ("tracking.storage_path", "data.catalog"):
        assert overrides[key].startswith(SHARED_MOUNT + "/"), f"{key} must be on the shared volume"
    # the URI names the Service of mlflow-k8s.yaml, and that server accepts it as Host header
    service = _one(MLFLOW_K8S, "Service")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert uri == f"http://{host}:{service['spec']['ports'][0]['port']}"
    command = _one(MLFLOW_K8S, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    allowed = next(a for a in command if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert uri.split("//", 1)[1] in allowed, f"mlflow-k8s.yaml: --allowed-hosts lacks the RayJob's {uri}"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["submissionMode"] == "K8sJobMode"
    if "runtimeEnvYAML" in spec:  # env_vars only: the working directory comes from the image
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert set(runtime_env) <= {"env_vars"}, runtime_env


# --- MLflow with docker compose -------------------------------------------------------------

def test_compose_publishes_mlflow_on_loopback_only_and_not_the_database():
    services = _compose()["services"]
    assert "ports" not in services["db"], "the database is reached over the compose network only"
    published = []
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"
            published.append(name)
    assert published == ["mlflow"]


def test_compose_takes_secrets_from_the_environment():
    services = _compose()["services"]
    checked = 0
    for name, service in services.items():
        for key, value in _compose_env(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+(:?[?-][^}]*)?\}", value), f"{name}: {key} is a literal"
                checked += 1
            if match := URI_PASSWORD.search(value):
                assert match["password"].startswith("${"), f"{name}: {key} has a literal password"
                checked += 1
    assert _compose_env(services["db"])["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    assert checked >= 2  # the database password and the backend store URI


def test_mlflow_images_follow_the_installed_mlflow():
    mlflow = pytest.importorskip("mlflow")
    dockerfile = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    version = _image_tag(dockerfile, "ghcr.io/mlflow/mlflow").removeprefix("v")
    assert version.split(".")[:2] == mlflow.__version__.split(".")[:2], \
        f"cluster/mlflow/Dockerfile has MLflow {version}, the project {mlflow.__version__}"
    assert "psycopg2" in dockerfile, "the PostgreSQL backend store needs psycopg2"
    mlflow_service = _compose()["services"]["mlflow"]
    assert mlflow_service["build"]["context"] == "."  # builds cluster/mlflow/Dockerfile
    deployment = _one(MLFLOW_K8S, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for image in (mlflow_service["image"], deployment["image"]):
        assert image.rsplit(":", 1)[1] == version, image


def test_pyproject_pins_ray_and_mlflow_to_the_images():
    """A fresh install must get the Ray of the cluster image and the MLflow series of the
    tracking server's image, whatever PyPI has released since (a floating `>=` once let a
    clean clone install MLflow 3.18 beside a 3.17 server image)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(d for d in deps if d.startswith("ray["))
    ray_tag = _image_tag((CLUSTER / "Dockerfile").read_text(), "rayproject/ray")
    assert ray_pin.endswith("==" + ray_tag.split("-")[0]), (ray_pin, ray_tag)
    mlflow_pin = next(d for d in deps if d.startswith("mlflow"))
    major, minor = _image_tag((CLUSTER / "mlflow" / "Dockerfile").read_text(),
                              "ghcr.io/mlflow/mlflow").removeprefix("v").split(".")[:2]
    assert mlflow_pin == f"mlflow>={major}.{minor},<{major}.{int(minor) + 1}", mlflow_pin


def test_mlflow_server_options_exist_in_the_installed_mlflow():
    pytest.importorskip("mlflow")
    from mlflow.cli import server

    known = {opt for param in server.params for opt in param.opts}
    commands = [_compose()["services"]["mlflow"]["command"],
                _one(MLFLOW_K8S, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]]
    for command in commands:
        assert command[:2] == ["mlflow", "server"], command
        options = [arg.split("=", 1)[0] for arg in command[2:] if arg.startswith("-")]
        assert options and set(options) <= known, set(options) - known


# --- the Ray image ------------------------------------------------------------------------

def test_ray_image_and_ray_version_follow_the_installed_ray():
    ray = pytest.importorskip("ray")
    tag = _image_tag((CLUSTER / "Dockerfile").read_text(), "rayproject/ray")
    assert tag.startswith(f"{ray.__version__}-") and tag.endswith("-gpu"), \
        f"cluster/Dockerfile uses rayproject/ray:{tag}; the project has Ray {ray.__version__}"
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, where


def test_ray_image_pins_torch_like_the_makefile_and_runs_as_non_root():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    makefile_pins = re.search(r"^TORCH_PINS\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    image_pins = re.search(r'^ARG TORCH_PINS="([^"]+)"', dockerfile, re.M)
    assert makefile_pins and image_pins
    assert image_pins.group(1).split() == makefile_pins.group(1).split(), "cluster/Dockerfile vs Makefile"
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), users
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "demo", "mlflow.db", "ray_results"} <= set(ignored)
