"""Module 04 integration tests: the openai backend over real HTTP against llama-cpp-python's OpenAI-compatible
server on the packaged Gemma, real-world copy for two offers, registry failures, brand and CLIP scorers, router."""
import os, shutil, socket, subprocess, sys, time

import httpx
import pytest
import yaml

from loyaltylens import generation as g
from loyaltylens.core import get_settings


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory):
    "llama_cpp.server on the packaged Gemma on a free loopback port; yields its /v1 base URL."
    from loyaltylens.core import gemma_gguf_path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama-server") / "server.log"  # a file, not a pipe: llama.cpp logs a lot at load
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gemma_gguf_path()), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "1024", "--n_threads", str(get_settings().llm_threads or os.cpu_count()), "--model_alias", "gemma-3-270m"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            if proc.poll() is not None: pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            time.sleep(0.5)
        else: pytest.fail("llama_cpp.server did not become ready in 300 s")
        yield base
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()


@pytest.fixture()
def openai_env(openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
    monkeypatch.setenv("LOYALTYLENS_OPENAI_MODEL", "gemma-3-270m")
    return openai_server


CUSTOMER = dict(customer_id="C-test", recency_days=6, frequency_30d=4, monetary_90d=96.0, offer_redemption_rate=0.2,
                channel_preference="web", engagement_score=0.41)
OFFER = dict(offer_id="OF-test", title="Burger Barn: 25% off craft burgers", category="dining", discount_pct=25.0, expiry_days=7)


def test_openai_backend_over_http(openai_env):
    copy = g.write_copy(CUSTOMER, 0.47, OFFER, backend="openai")
    assert copy.backend == "openai" and copy.model == "gemma-3-270m"
    assert copy.prompt_tokens > 100 and copy.completion_tokens > 5  # the server's tokenizer counts
    assert copy.headline.startswith("25% off")
    # llama-cpp-python's server rejects response_format json_schema; the backend noticed and sent the grammar instead
    assert any(openai_env in u for u in g._NO_JSON_SCHEMA)


def test_openai_backend_sends_json_schema_first(openai_env):
    "A fresh process-level state: the first request carries response_format json_schema (what OpenAI enforces)."
    import openai
    g._NO_JSON_SCHEMA.clear()
    client = openai.OpenAI(base_url=openai_env, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError, match="response_format"):
        client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    copy = g.write_copy(CUSTOMER, 0.47, {**OFFER, "discount_pct": 30.0}, version="v1", backend="openai")
    assert copy.prompt_version == "v1" and "30%" in copy.headline


def test_openai_backend_not_configured(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False); monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(g.GenerationError, match="OPENAI_API_KEY"):
        g.write_copy(CUSTOMER, 0.5, OFFER, backend="openai")


def test_two_offers_same_customer_real_world():
    cat = g.offer_catalog(True)
    a = cat.iloc[0]
    b = cat[(cat.category != a.category) & (cat.discount_pct != a.discount_pct)].iloc[0]
    from loyaltylens.features import default_store
    cid = default_store(True).get_many([f"C{i:08d}" for i in range(100)]).customer_id.iloc[3]
    for o, other in [(a, b), (b, a)]:
        copy = g.generate_copy(cid, o.offer_id, smoke=True)
        text = f"{copy.headline} {copy.body}".lower()
        assert f"{o.discount_pct:g}%" in text or o.category in text, (o.title, copy)
        assert f"{other.discount_pct:g}%" not in copy.headline
        assert (copy.customer_id, copy.offer_id) == (cid, o.offer_id)


@pytest.fixture()
def scratch_registry(tmp_path):
    shutil.copytree(g.PromptRegistry().root, tmp_path / "prompts")
    return g.PromptRegistry(tmp_path / "prompts")


def test_malformed_yaml_names_file(scratch_registry):
    (scratch_registry.root / "v5.yaml").write_text("version: v5\nsystem: 'unterminated\n")
    with pytest.raises(g.PromptError, match=r"v5\.yaml: malformed YAML"): scratch_registry.load("v5")
    with pytest.raises(g.PromptError, match=r"v5\.yaml"): scratch_registry.load_all()


def test_missing_placeholder_names_file_and_field(scratch_registry):
    data = yaml.safe_load((scratch_registry.root / "v2.yaml").read_text()) | {"version": "v5"}
    del data["few_shot"][1]["inputs"]["discount"]
    (scratch_registry.root / "v5.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(g.PromptError, match=r"v5\.yaml.*few_shot\[1\]\.inputs: placeholder \{discount\} has no value"):
        scratch_registry.load("v5")
    with pytest.raises(g.PromptError, match=r"prompts/v2\.yaml: user_template placeholder \{category\} has no value"):
        g.render_prompt(g.PromptRegistry().get("v2").user_template, {"recency_days": 1}, "prompts/v2.yaml")


def test_missing_required_field_names_it(scratch_registry):
    data = yaml.safe_load((scratch_registry.root / "v1.yaml").read_text()) | {"version": "v5"}
    del data["eval_criteria"]["gate_threshold"], data["author"]
    (scratch_registry.root / "v5.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(g.PromptError, match=r"v5\.yaml: invalid PromptVersion: author: Field required"): scratch_registry.load("v5")


def test_unknown_version_is_clear(scratch_registry):
    with pytest.raises(g.UnknownPromptVersion, match=r"unknown prompt version 'v404'.*\['v1', 'v2'\]"):
        g.write_copy(CUSTOMER, 0.5, OFFER, version="v404", registry=scratch_registry)


def test_activate_and_history(scratch_registry):
    before = len(scratch_registry.history())
    scratch_registry.activate("v1", by="pytest", reason="rollback drill")
    assert scratch_registry.active_version() == "v1" and scratch_registry.get().version == "v1"
    h = scratch_registry.history()
    assert len(h) == before + 1 and (h[-1].version, h[-1].by, h[-1].reason) == ("v1", "pytest", "rollback drill")
    with pytest.raises(g.UnknownPromptVersion): scratch_registry.activate("v77")
    assert g.PromptRegistry().active_version() == "v2"  # the repository file is untouched


def test_every_shipped_version_generates_valid_copy():
    for v in g.PromptRegistry().versions():
        copy = g.write_copy(CUSTOMER, 0.47, OFFER, version=v, backend="local")
        assert copy.prompt_version == v and copy.headline.startswith("25% off")


def test_brand_scores_rank_good_above_off_brand():
    good = g.CopyText(headline="25% off dining for two", body="Thanks for being a member: enjoy 25% off craft burgers at Burger Barn this week.",
                      cta="Book my table", tone="friendly")
    pushy = g.CopyText(headline="BUY NOW!!! Cheapest burgers", body="Guaranteed lowest prices, act now!", cta="CLICK HERE", tone="urgent")
    s_good, s_bad = g.brand_scores([good, pushy])
    assert s_good.score > s_bad.score and s_good.violations == [] and len(s_bad.violations) >= 3


def test_clip_plumbing_on_random_tiny_model(tmp_path):
    scorer = g.random_clip_scorer(tmp_path)
    s = g.clip_brand_scores([g.CopyText(headline="25% off dining", body="b", cta="c", tone="friendly")] * 2, scorer=scorer)
    assert s.shape == (2,) and abs(s[0] - s[1]) < 1e-5 and abs(s[0]) <= 1


def test_clip_quality_with_real_weights():
    if not g.clip_weights_available():
        pytest.skip(f"CLIP quality check needs the {g.CLIP_MODEL} weights in the local Hugging Face cache (none here; offline)")
    scorer = g.ClipScorer.load()
    from PIL import Image
    img = Image.new("RGB", (224, 224), (220, 30, 30))
    s = scorer.score(img, ["a plain red square", "a photo of a dog on a beach"])
    assert s[0] > s[1]


def test_router_errors_without_generation():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    os.environ["LOYALTYLENS_SMOKE"] = "1"
    try:
        http = TestClient(FastAPI()); http.app.include_router(g.router)
        cat = g.offer_catalog(True)
        from loyaltylens.features import default_store
        cid = default_store(True).get_many([f"C{i:08d}" for i in range(50)]).customer_id.iloc[0]
        assert http.post("/copy/generate", json={"customer_id": "C-nope", "offer_id": cat.offer_id.iloc[0]}).status_code == 404
        assert http.post("/copy/generate", json={"customer_id": cid, "offer_id": "OF-nope"}).status_code == 404
        r = http.post("/copy/generate", json={"customer_id": cid, "offer_id": cat.offer_id.iloc[0], "prompt_version": "v9"})
        assert r.status_code == 422 and "prompt_version" in r.text
        r = http.post("/copy/generate", json={"customer_id": cid, "offer_id": cat.offer_id.iloc[0], "backend": "claude"})
        assert r.status_code == 422 and "backend" in r.text
    finally:
        del os.environ["LOYALTYLENS_SMOKE"]
