"""Tests of loyaltylens.deploy: the SageMaker model.tar.gz unpacked and driven through its handlers exactly as the
serving container does; the serving container's server as a real process over HTTP (SageMaker and Vertex AI contracts);
`loyaltylens deploy sagemaker deploy|invoke|teardown` end to end against moto; Vertex AI contract tests at the client
boundary (no local Vertex emulator exists). Scores must equal the in-process model within 1e-5, under exactly the
ONNX Runtime version the serving container pins."""
import ast, json, os, re, socket, tarfile
from pathlib import Path

import boto3
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import requests
from moto import mock_aws
from typer.testing import CliRunner

from loyaltylens import features as fs, propensity as prop
from loyaltylens.core import app as cli
from loyaltylens.deploy import (ENDPOINT, ONNX_INPUTS, ONNX_OUTPUT, VERTEX_HEALTH_ROUTE, VERTEX_PREDICT_ROUTE, container_context,
                                deploy_dir, invoke_handlers, load_handlers, package_sagemaker, pinned_version, raw_inputs,
                                start_container_server, unpack, vertex_deploy, vertex_predict, vertex_undeploy)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = True
TOL = prop.AGREEMENT_TOLERANCE  # max |score - in-process score|
REGION, BUCKET = "eu-west-1", "loyaltylens-test-models"


@pytest.fixture(scope="module")
def model():
    return prop.default_model(SMOKE)


@pytest.fixture(scope="module")
def frame(model):
    return fs.default_store(SMOKE).get_many([f"C{i:08d}" for i in range(800)])


@pytest.fixture(scope="module")
def rows(model, frame):
    return frame[fs.FEATURE_COLUMNS].to_dict("records"), model.predict(frame)


@pytest.fixture(scope="module")
def tarball(model, tmp_path_factory):
    return package_sagemaker(model, tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def model_dir(tarball, tmp_path_factory):
    return unpack(tarball, tmp_path_factory.mktemp("opt-ml-model"))


def test_tarball_has_the_sagemaker_layout(tarball):
    with tarfile.open(tarball) as t: assert sorted(t.getnames()) == ["code/inference.py", "code/requirements.txt", "model.onnx"]


def test_onnx_artefact_under_the_pinned_onnxruntime(model, frame, model_dir):
    """The container's pairing: model.onnx from the tarball, loaded by the ONNX Runtime version deploy/code/requirements.txt
    pins (the dev environment installs that pin), scores like the in-process model for 1 row and for many (dynamic batch)."""
    pin = pinned_version("onnxruntime")
    assert ort.__version__ == pin, f"onnxruntime {ort.__version__} is installed, the container pins {pin}: run `make install`"
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(ONNX_INPUTS) and session.get_outputs()[0].name == ONNX_OUTPUT
    assert session.get_inputs()[0].shape == ["batch"] and session.get_inputs()[1].shape == ["batch", len(prop.NUMERIC_COLUMNS)]
    schema = json.loads(session.get_modelmeta().custom_metadata_map["schema"])
    assert schema["channels"] == list(model.pre.channels) and schema["numeric_columns"] == prop.NUMERIC_COLUMNS
    chan, num = raw_inputs(model, frame)
    expected = model.predict(frame)
    assert len(frame) > 100, len(frame)
    for n in (1, 7, len(frame)):  # one row, an odd batch unlike the export's example, every row
        got = session.run(None, dict(zip(ONNX_INPUTS, (chan[:n], num[:n]))))[0]
        assert got.shape == (n,) and np.abs(got - expected[:n]).max() <= TOL, (n, np.abs(got - expected[:n]).max())


def test_the_pin_is_exact():
    "A range would let the container and the tests load the model with different runtimes."
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned_version("onnxruntime"))
    with pytest.raises(ValueError, match="not pinned"): pinned_version("numpy")


def test_handlers_score_like_the_model(model_dir, rows):
    instances, expected = rows
    handlers, loaded = load_handlers(model_dir)  # import code/inference.py, call model_fn(model_dir): the container's start-up
    for body in (json.dumps({"instances": instances}), json.dumps(instances).encode()):  # Vertex shape, bare list as bytes
        got = np.array(json.loads(invoke_handlers(handlers, loaded, body))["predictions"])
        assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    for bad, field in [({**instances[0], "channel_preference": "fax"}, "channel_preference"), ({**instances[0], "recency_days": "3"}, "recency_days"),
                       ({**instances[0], "engagement_score": float("nan")}, "engagement_score")]:
        with pytest.raises(ValueError, match=field): invoke_handlers(handlers, loaded, json.dumps(bad))
    with pytest.raises(ValueError, match="content type"): handlers.input_fn("{}", "text/csv")


def test_handlers_need_only_what_the_container_installs():
    "The container has ONNX Runtime and numpy, not torch or loyaltylens: inference.py may import the standard library and those."
    tree = ast.parse((deploy_dir() / "code" / "inference.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"json", "math", "os", "numpy", "onnxruntime"}, mods
    reqs = (deploy_dir() / "code" / "requirements.txt").read_text()
    assert "onnxruntime==" in reqs and "numpy" in reqs and "torch" not in reqs


def test_container_server_answers_both_contracts(model_dir, rows):
    instances, expected = rows
    proc, url = start_container_server(model_dir)  # AIP_HTTP_PORT / AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE set, as Vertex does
    try:
        assert httpx.get(f"{url}/ping").status_code == 200 and httpx.get(f"{url}{VERTEX_HEALTH_ROUTE}").status_code == 200
        sm = httpx.post(f"{url}/invocations", json=instances, timeout=60)
        vx = httpx.post(f"{url}{VERTEX_PREDICT_ROUTE}", json={"instances": instances}, timeout=60)
        for r in (sm, vx):
            assert r.status_code == 200, r.text
            assert np.abs(np.array(r.json()["predictions"]) - expected).max() <= TOL
        bad = httpx.post(f"{url}{VERTEX_PREDICT_ROUTE}", json={"instances": [{"recency_days": 1}]})
        assert bad.status_code == 400 and "channel_preference" in bad.json()["error"]
        assert httpx.post(f"{url}/elsewhere", json={}).status_code == 404
    finally: proc.terminate(); proc.wait(10)


def test_container_server_listens_on_8080_without_vertex_variables(model_dir, rows):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8080)) == 0: pytest.skip("port 8080 is in use on this machine")
    proc, url = start_container_server(model_dir, vertex=False)
    try:
        assert url.endswith(":8080")
        r = httpx.post(f"{url}/invocations", json=rows[0][:5])
        assert np.abs(np.array(r.json()["predictions"]) - rows[1][:5]).max() <= TOL
    finally: proc.terminate(); proc.wait(10)


def test_container_context_and_dockerfile(tarball, tmp_path):
    "The build context is complete. The image itself is not built here (no container engine); server.py is tested as a process."
    ctx = container_context(tarball, tmp_path / "ctx")
    assert sorted(p.name for p in ctx.iterdir()) == ["Dockerfile", "model", "server.py"]
    assert (ctx / "model" / "model.onnx").is_file() and (ctx / "model" / "code" / "inference.py").is_file()
    docker = (ctx / "Dockerfile").read_text()
    assert "EXPOSE 8080" in docker and 'ENTRYPOINT ["python", "/srv/server.py"]' in docker and "COPY model/ /opt/ml/model/" in docker
    assert "pip install --no-cache-dir -r /tmp/requirements.txt" in docker and "COPY model/code/requirements.txt" in docker
    assert "torch" not in docker.split("FROM", 1)[1].lower(), "the serving image installs the pinned runtime, not torch"


def test_no_account_ids_in_the_deploy_code():
    files = [*deploy_dir().rglob("*"), ROOT / "loyaltylens" / "deploy.py", ROOT / "nbs" / "07a_deploy.ipynb", Path(__file__)]
    hits = [(f.name, m) for f in files if f.is_file() for m in re.findall(r"(?<![\d.])\d{12}(?![\d.])", f.read_text(errors="ignore"))]
    assert hits == []


@pytest.fixture
def aws(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": REGION,
                 "AWS_DEFAULT_REGION": REGION, "LOYALTYLENS_S3_BUCKET": BUCKET}.items(): monkeypatch.setenv(k, v)
    with mock_aws():
        account = boto3.client("sts", region_name=REGION).get_caller_identity()["Account"]  # moto's: no account id in this file
        monkeypatch.setenv("LOYALTYLENS_SAGEMAKER_IMAGE", f"{account}.dkr.ecr.{REGION}.amazonaws.com/loyaltylens-propensity:1")
        boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        role = boto3.client("iam", region_name=REGION).create_role(RoleName="loyaltylens-sagemaker", AssumeRolePolicyDocument="{}")
        monkeypatch.setenv("LOYALTYLENS_SAGEMAKER_ROLE", role["Role"]["Arn"])  # made by moto: no account id in this file
        yield boto3.client("sagemaker", region_name=REGION)


def test_sagemaker_deploy_invoke_teardown_with_moto(aws, tarball, model_dir, rows):
    """What is real: every boto3 call (request serialisation, S3 upload, model/config/endpoint creation, the waiter,
    invoke, deletes) runs against moto's implementation of the APIs, through the CLI. What is not: moto cannot run the
    model; its invoke_endpoint returns a queued body. We queue the body our handlers produce from the same tarball, so
    the invoke leg tests request and response plumbing; the scores are tested by the handler and container tests."""
    run = lambda *a: CliRunner().invoke(cli, ["deploy", "sagemaker", *a])
    r = run("deploy", "--tarball", str(tarball))
    assert r.exit_code == 0 and f"{ENDPOINT}: InService" in r.output, r.output
    m = aws.describe_model(ModelName=ENDPOINT)
    assert m["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/loyaltylens/{ENDPOINT}/model.tar.gz"
    assert m["PrimaryContainer"]["Image"] == os.environ["LOYALTYLENS_SAGEMAKER_IMAGE"]  # our serving image, not a framework image
    obj = boto3.client("s3", region_name=REGION).get_object(Bucket=BUCKET, Key=f"loyaltylens/{ENDPOINT}/model.tar.gz")["Body"].read()
    assert obj == tarball.read_bytes()
    instances, expected = rows[0][:3], rows[1][:3]
    handlers, loaded = load_handlers(model_dir)
    body = invoke_handlers(handlers, loaded, json.dumps({"instances": instances}))
    requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                  json={"region": REGION, "results": [{"Body": body, "ContentType": "application/json"}]})
    r = run("invoke", "--payload", json.dumps(instances))
    assert r.exit_code == 0, r.output
    assert np.abs(np.array(json.loads(r.output)["predictions"]) - expected).max() <= TOL
    assert run("invoke", "--payload", '{"recency_days": -1}').exit_code == 2
    r = run("teardown")
    assert r.exit_code == 0 and "endpoint, endpoint config, model" in r.output, r.output
    assert aws.list_endpoints()["Endpoints"] == [] and aws.list_models()["Models"] == [] and aws.list_endpoint_configs()["EndpointConfigs"] == []
    r = run("teardown")  # idempotent
    assert r.exit_code == 0 and "nothing (already gone)" in r.output, r.output


def test_sagemaker_refuses_without_settings(monkeypatch):
    for k in ("AWS_REGION", "LOYALTYLENS_SAGEMAKER_ROLE", "LOYALTYLENS_S3_BUCKET", "LOYALTYLENS_SAGEMAKER_IMAGE"): monkeypatch.delenv(k, raising=False)
    r = CliRunner().invoke(cli, ["deploy", "sagemaker", "teardown"])
    assert r.exit_code == 2 and "AWS_REGION" in r.output and "LOYALTYLENS_S3_BUCKET" in r.output
    for k, v in {"AWS_REGION": REGION, "LOYALTYLENS_SAGEMAKER_ROLE": "loyaltylens-sagemaker", "LOYALTYLENS_S3_BUCKET": BUCKET}.items(): monkeypatch.setenv(k, v)
    r = CliRunner().invoke(cli, ["deploy", "sagemaker", "deploy"])  # refused before anything is packaged or uploaded
    assert r.exit_code == 2 and "LOYALTYLENS_SAGEMAKER_IMAGE" in r.output, r.output


class FakeVertex:
    "google.cloud.aiplatform at the client boundary: records the calls; predict forwards to the real container server."
    def __init__(self, server_url: str):
        self.calls, self.models, self.endpoints, self.url = [], [], [], server_url
        fake = self

        class Model:
            def __init__(self, **kw): self.kw, self.resource_name = kw, f"projects/p/locations/l/models/{len(fake.models)}"
            @classmethod
            def upload(cls, **kw):
                fake.calls.append(("Model.upload", kw)); m = cls(**kw); fake.models.append(m); return m
            @classmethod
            def list(cls, filter): return [m for m in fake.models if f'display_name="{m.kw["display_name"]}"' == filter]
            def deploy(self, endpoint, **kw): fake.calls.append(("Model.deploy", kw)); endpoint.deployed.append(self)
            def delete(self): fake.calls.append(("Model.delete", self.resource_name)); fake.models.remove(self)

        class Endpoint:
            def __init__(self, display_name):
                self.display_name, self.deployed = display_name, []
                self.resource_name = f"projects/p/locations/l/endpoints/{len(fake.endpoints)}"
            @classmethod
            def create(cls, display_name): fake.calls.append(("Endpoint.create", display_name)); e = cls(display_name); fake.endpoints.append(e); return e
            @classmethod
            def list(cls, filter): return [e for e in fake.endpoints if f'display_name="{e.display_name}"' == filter]
            def predict(self, instances):
                up = self.deployed[0].kw  # the route Vertex would call is the one declared at upload
                r = httpx.post(f"{fake.url}{up['serving_container_predict_route']}", json={"instances": instances}, timeout=60)
                r.raise_for_status()
                return type("Prediction", (), {"predictions": r.json()["predictions"]})()
            def undeploy_all(self): fake.calls.append(("Endpoint.undeploy_all", self.resource_name)); self.deployed.clear()
            def delete(self): fake.calls.append(("Endpoint.delete", self.resource_name)); fake.endpoints.remove(self)

        self.Model, self.Endpoint = Model, Endpoint
        self.init = lambda **kw: self.calls.append(("init", kw))


def test_vertex_contract_deploy_predict_undeploy(model_dir, rows, monkeypatch):
    "Contract test: the calls our code makes to google-cloud-aiplatform, and the container answering the routes it declares."
    from google.cloud import aiplatform
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "loyaltylens-test")
    proc, url = start_container_server(model_dir)
    try:
        fake = FakeVertex(url)
        for name in ("init", "Model", "Endpoint"): monkeypatch.setattr(aiplatform, name, getattr(fake, name))
        vertex_deploy("europe-docker.pkg.dev/loyaltylens-test/serving/propensity:1")
        upload = dict(fake.calls)["Model.upload"]
        assert upload["serving_container_health_route"] == VERTEX_HEALTH_ROUTE and upload["serving_container_ports"] == [8080]
        assert httpx.get(f"{url}{upload['serving_container_health_route']}").status_code == 200
        assert dict(fake.calls)["init"] == {"project": "loyaltylens-test", "location": "us-central1"}
        assert dict(fake.calls)["Model.deploy"]["machine_type"] == "n1-standard-2"
        instances, expected = rows[0][:50], rows[1][:50]
        assert np.abs(np.array(vertex_predict(instances)) - expected).max() <= TOL
        assert len(vertex_undeploy()) == 2 and vertex_undeploy() == []
        with pytest.raises(LookupError, match="loyaltylens deploy vertex deploy"): vertex_predict(instances)
    finally: proc.terminate(); proc.wait(10)


def test_vertex_contract_refuses_without_settings(monkeypatch):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    monkeypatch.delenv("LOYALTYLENS_VERTEX_IMAGE", raising=False)
    r = CliRunner().invoke(cli, ["deploy", "vertex", "deploy"])
    assert r.exit_code == 2 and "LOYALTYLENS_VERTEX_IMAGE" in r.output
