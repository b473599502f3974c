"""Module 04 integration tests: the openai backend over real HTTP against llama-cpp-python's OpenAI-compatible
server on the packaged Gemma, real-world copy for two offers, registry failures, brand and CLIP scorers, router."""
import json, os, shutil, socket, subprocess, sys, time

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
OFFER = dict(offer_id="OF-test", title="Burger Barn: 25% off craft burgers", category="dining", channel="web", discount_pct=25.0, expiry_days=7)


def test_openai_backend_over_http(openai_env):
    copy = g.write_copy(CUSTOMER, 0.47, OFFER, backend="openai", check_facts=False)  # the transport is under test here
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
    copy = g.write_copy(CUSTOMER, 0.47, {**OFFER, "discount_pct": 30.0}, version="v1", backend="openai", check_facts=False)
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
    del data["author"]
    (scratch_registry.root / "v5.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(g.PromptError, match=r"v5\.yaml: invalid PromptVersion: author: Field required"): scratch_registry.load("v5")


def test_unknown_version_is_clear(scratch_registry):
    with pytest.raises(g.UnknownPromptVersion, match=r"unknown prompt version 'v404'.*\['v1', 'v2'"):
        g.write_copy(CUSTOMER, 0.5, OFFER, version="v404", registry=scratch_registry)


def test_activate_and_history(scratch_registry):
    serving = g.PromptRegistry().active_version()
    before = len(scratch_registry.history())
    scratch_registry.activate("v1", by="pytest", reason="rollback drill")
    assert scratch_registry.active_version() == "v1" and scratch_registry.get().version == "v1"
    h = scratch_registry.history()
    assert len(h) == before + 1 and (h[-1].version, h[-1].by, h[-1].reason) == ("v1", "pytest", "rollback drill")
    with pytest.raises(g.UnknownPromptVersion): scratch_registry.activate("v77")
    assert g.PromptRegistry().active_version() == serving  # the repository file is untouched


def test_every_serving_version_generates_valid_copy():
    for v in ("v1", "v2"):  # the versions written to serve (v3-pushy is notebook 05's deliberately bad prompt)
        copy = g.write_copy(CUSTOMER, 0.47, OFFER, version=v, backend="local")
        assert copy.prompt_version == v and copy.headline.startswith("25% off")
        assert g.fact_check(copy, OFFER, CUSTOMER) == []


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


def test_router_errors_without_generation(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    monkeypatch.setenv("LOYALTYLENS_SMOKE", "1")  # restored after the test: later tests keep their own world size
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


# --- registry: version names and concurrent activation ---

def test_slug_versions_load_and_sort(scratch_registry):
    data = yaml.safe_load((scratch_registry.root / "v2.yaml").read_text())
    for v in ("v3-pushy", "v10", "v3"):
        (scratch_registry.root / f"{v}.yaml").write_text(yaml.safe_dump({**data, "version": v}))
    (scratch_registry.root / "v4-Bad.yaml").write_text(yaml.safe_dump({**data, "version": "v4-Bad"}))  # uppercase slug: not a version
    versions = scratch_registry.versions()  # the shipped prompts plus the three written here
    assert [v for v in versions if v in {"v2", "v3", "v3-pushy", "v10"}] == ["v2", "v3", "v3-pushy", "v10"], versions  # by number, then slug
    assert "v4-Bad" not in versions and versions[-1] == "v10", versions
    assert scratch_registry.load("v3-pushy").version == "v3-pushy"
    with pytest.raises(g.UnknownPromptVersion): scratch_registry.load("v4-Bad")


def _activate_many(root, version, who, n):
    reg = g.PromptRegistry(root)
    for i in range(n): reg.activate(version, by=f"{who}-{i}")


def test_concurrent_activations_lose_no_entry(scratch_registry):
    import multiprocessing as mp
    before = len(scratch_registry.history())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_activate_many, args=(str(scratch_registry.root), v, f"p{k}", 10)) for k, v in enumerate(["v1", "v2", "v1", "v2"])]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    by = sorted(h.by for h in scratch_registry.history()[before:])
    assert by == sorted(f"p{k}-{i}" for k in range(4) for i in range(10))
    assert list(scratch_registry.root.glob("*.tmp")) == []


# --- fact_check ---

FACT_OFFER = dict(offer_id="OF-f", title="Bed & Bath Co: 20% off bedding", description="", category="home", channel="web",
                  discount_pct=20.0, expiry_days=14, min_propensity=0.1)
FACT_CUSTOMER = dict(recency_days=3, frequency_30d=2, monetary_90d=64.0, offer_redemption_rate=0.25, channel_preference="mobile",
                     engagement_score=0.4)


@pytest.mark.parametrize("body, flagged", [
    ("You save 20% on bedding at Bed & Bath Co online within 14 days.", []),
    ("You save 15% on bedding at Bed & Bath Co.", ["15%"]),  # an invented percentage
    ("You get a $15 discount on bedding.", ["$15"]),  # money the offer does not give
    ("Shop online in the next three weeks.", ["three weeks"]),  # a duration that is not the expiry
    ("Treat yourself at FreshMart today.", ["FreshMart", "today"]),  # another brand; "today" on a 14-day offer
    ("Drop by the store for 20% off bedding.", ["Drop by", "store"]),  # in-store wording on a web offer
    ("We saved 20% for you. Use code 30OFF.", ["30", "code", "30OFF", "We"]),
    ("Enjoy 20% off bedding <b>online</b>.", ["<b>", "</b>"]),
    ("You save 20% on bedding…", ["…", "bedding…"]),
])
def test_fact_check_spans(body, flagged):
    copy = dict(headline="20% off bedding", body=body, cta="Shop bedding")
    assert sorted(g.fact_check(copy, FACT_OFFER, FACT_CUSTOMER)) == sorted(flagged)


def test_fact_check_accepts_copy_objects_and_customer_facts():
    copy = g.CopyText(headline="20% off bedding", body="Since your last visit 3 days ago, you can take 20% off bedding online.",
                      cta="Shop bedding", tone="friendly")
    assert g.fact_check(copy, FACT_OFFER, FACT_CUSTOMER) == []
    assert g.fact_check(copy, {**FACT_OFFER, "channel": "mobile"}, FACT_CUSTOMER) == ["online"]


def test_fact_check_accepts_a_hyphenated_brand_of_the_offer():
    offer = {**FACT_OFFER, "title": "Fix-It Depot: 20% off bedding"}
    copy = dict(headline="20% off bedding", body="You get 20% off bedding at Fix-It Depot online.", cta="Shop bedding")
    assert g.fact_check(copy, offer, FACT_CUSTOMER) == []
    assert g.fact_check({**copy, "body": "You get 20% off bedding at Fix-All Depot online."}, offer, FACT_CUSTOMER) == ["Fix-All"]


def test_shipped_few_shot_examples_are_true_to_their_offer():
    for v in ("v1", "v2"):
        for i, ex in enumerate(g.PromptRegistry().get(v).few_shot):
            offer = dict(title=ex.inputs["title"], category=ex.inputs["category"], discount_pct=float(ex.inputs["discount"]),
                         expiry_days=int(ex.inputs["expiry_days"]),
                         channel={w: c for c, w in g.CHANNEL_WORDS.items()}[ex.inputs["offer_channel"]])
            assert g.fact_check(ex.output, offer, {}) == [], (v, i, ex.output)


# --- fast route vs GBNF reference ---

@pytest.fixture(scope="module")
def decoder():
    return g.load_decoder()


def _fixtures():
    ok = json.dumps(dict(headline="25% off dining tonight", body="You save on craft burgers.", cta="Book now", tone="urgent"))
    return {"valid": ok, "prefix only": ok.replace(" tonight", ""), "other discount": ok.replace("25%", "30%"),
            "bad tone": ok.replace("urgent", "calm"), "double space": ok.replace("craft burgers", "craft  burgers"),
            "escaped quote": ok.replace("craft", '\\"craft\\"'), "body too long": ok.replace("You save on craft burgers.", " ".join(["w"] * 36)),
            "body at its limit": ok.replace("You save on craft burgers.", " ".join(["w"] * 35)), "missing cta": ok.replace('"cta": "Book now", ', ""),
            "trailing text": ok + "\n", "leading space": ok.replace('"You', '" You'), "non-ASCII": ok.replace("craft", "crème"),
            "long word": ok.replace("craft", "c" * 25), "extra key": ok[:-1] + ', "x": "y"}'}


def test_fast_and_gbnf_accept_the_same_strings(decoder):
    limits = g.PromptRegistry().get("v2").eval_criteria.word_limits
    grammar, pattern = g.copy_grammar(limits, "25% off dining"), g.copy_pattern(limits, "25% off dining")
    verdicts = {k: (g.gbnf_accepts(grammar, s, decoder), bool(pattern.fullmatch(s))) for k, s in _fixtures().items()}
    assert all(a == b for a, b in verdicts.values()), verdicts
    assert {k for k, (a, _) in verdicts.items() if a} == {"valid", "prefix only", "body at its limit", "non-ASCII"}


def test_prefix_reuse_gives_the_cold_greedy_output(decoder):
    ctx = g.prompt_context(CUSTOMER, 0.47, OFFER)
    prompt = g.few_shot_prompt(g.PromptRegistry().get("v2"), ctx)

    def greedy(reuse):
        evaluated, out = decoder.eval_prompt(prompt, reuse), []
        for _ in range(10):
            out.append(int(decoder.logits().argmax())); decoder.llm.eval(out[-1:])
        return out, evaluated

    decoder.eval_prompt(prompt.replace("craft burgers", "vegan tacos"))  # another customer's prompt in the cache
    (warm, n_warm), (cold, n_cold) = greedy(True), greedy(False)
    assert warm == cold
    assert n_cold == len(decoder.tokens(prompt, bos=True)) and n_warm < n_cold / 3


def test_fast_route_output_is_in_the_grammar_language_and_true(decoder):
    pv = g.PromptRegistry().get("v2")
    pattern = g.copy_pattern(pv.eval_criteria.word_limits, "25% off dining")
    for seed in range(3):
        c = g.write_copy(CUSTOMER, 0.47, OFFER, version="v2", backend="local", seed=seed)
        text = json.dumps(c.model_dump(include={"headline", "body", "cta", "tone"}), ensure_ascii=False)
        assert pattern.fullmatch(text), text
        assert g.fact_check(c, OFFER, CUSTOMER) == []


# --- fact_check against the hand-labelled fact set ---

def test_fact_check_meets_its_bars_on_the_hand_labels():
    "Copy-level recall >= 0.95 and precision >= 0.90 on data/golden/fact_labels.jsonl (labelled by reading, not by fact_check)."
    labels = g.load_fact_labels()
    assert len(labels) >= 150 and (labels.spans.map(len) > 0).sum() >= 50, "the set is smaller than the issue asks"
    rows, s = g.fact_check_scores(labels)
    misses = rows[rows.outcome.isin(["FN", "FP"])].join(labels[["headline", "body", "cta", "spans"]])
    assert s["copy_recall"] >= 0.95, (s, misses[misses.outcome == "FN"].to_dict("records"))
    assert s["copy_precision"] >= 0.90, (s, misses[misses.outcome == "FP"].to_dict("records"))


def test_fact_labels_spans_are_in_their_copy():
    labels = g.load_fact_labels()
    for _, r in labels.iterrows():
        text = " | ".join([r.headline, r.body, r.cta])
        assert all(s["span"] in text and s["reason"] for s in r.spans), (r.id, r.spans)
