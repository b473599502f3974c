"""API fuzzing (issue 16): schemathesis generates requests from `/openapi.json` of `loyaltylens serve`, running as a
real process on loopback over the SMOKE world, and checks that nothing answers >= 500 and that every response (status
code and body) is one the schema documents. The LLM backend is `openai` with no key, so every copy request is a fast,
documented 503 instead of minutes of local generation; state-changing routes write to a copy of `prompts/` and to a
feedback schema of this test only."""
import re, shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from loyaltylens import features as fs, propensity as prop, retrieval as ret
from loyaltylens.pipeline import LoyaltyLensPipeline, serve_process, stop_process

SMOKE = True  # the small world: the API's contract does not depend on the world's size
EXAMPLES_PER_OPERATION = 70  # 16 operations x 70 = 1,120 generated cases (the floor is 1,000), ~1.5 min on 2 busy cores
MIN_CASES = 1000  # the floor for one run


def no_server_error_but_documented_503(ctx, response, case):
    """schemathesis' `not_a_server_error`, except a 503 the operation documents (a missing artefact or an unconfigured LLM:
    the project's rule, the message names the command that fixes it; `status_code_conformance` checks it is documented)."""
    if response.status_code == 503 and "503" in case.operation.definition.raw.get("responses", {}): return True
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error_but_documented_503, status_code_conformance, response_schema_conformance]
FUZZ_FEEDBACK_SCHEMA = "fuzz_feedback"  # PostgreSQL schema the fuzzed POST /feedback writes to (not the shared one)
LLM_OFF = {"LOYALTYLENS_LLM_BACKEND": "openai", "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}  # copy requests: fast 503

CASES: list[tuple[str, str, int]] = []  # (method, path, status) of every case sent, for the count and the report


@pytest.fixture(scope="module")
def server(tmp_path_factory, root):
    "`loyaltylens serve` over the SMOKE artefacts (built first, as `loyaltylens pipeline prepare --smoke` does)."
    fs.default_store(SMOKE); prop.default_model(SMOKE); ret.serving_retriever("pgvector", SMOKE)
    prompts = tmp_path_factory.mktemp("fuzz") / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    proc, url = serve_process({"LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_PROMPTS_DIR": str(prompts),
                               "LOYALTYLENS_FEEDBACK_SCHEMA": FUZZ_FEEDBACK_SCHEMA, "LOYALTYLENS_API_TOKEN": "",
                               "LOYALTYLENS_CORS_ORIGINS": "", **LLM_OFF})
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


def failure_kind(operation, error: BaseException) -> str:
    "One line per distinct failure: the operation, schemathesis' check codes and the status received."
    text = str(error)
    checks = sorted(set(re.findall(r"- (ST\d+ [^\n]+)", text))) or [text.splitlines()[0][:200]]
    status = re.search(r"\[(\d{3})\]", text)
    return f"{operation.method.upper()} {operation.path}: {'; '.join(checks)} (status {status[1] if status else '?'}); e.g. {text[-300:]!r}"


def fuzz_operation(operation) -> dict[str, int]:
    "Send EXAMPLES_PER_OPERATION generated requests to one operation; {distinct failure: how many cases} (the run goes on after one)."
    failures = {}

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        try:
            response = case.call_and_validate(checks=CHECKS, timeout=60)
            CASES.append((case.method, case.path, response.status_code))
        except (Exception, BaseExceptionGroup) as e:  # a failed check: record it with the request that caused it and keep fuzzing
            CASES.append((case.method, case.path, -1))
            kind = failure_kind(operation, e).split("; e.g.")[0]
            if kind not in failures: print(failure_kind(operation, e))
            failures[kind] = failures.get(kind, 0) + 1
    run()
    return failures


def test_fuzz_every_operation(api_schema):
    "Every operation, >= 1,000 cases in all: no 5xx, every status and body as documented."
    ops = [r.ok() for r in api_schema.get_all_operations()]
    failures = {k: n for op in ops for k, n in fuzz_operation(op).items()}
    by_status = {}
    for _, _, s in CASES: by_status[s] = by_status.get(s, 0) + 1
    print(f"fuzz: {len(CASES)} cases over {len(ops)} operations; statuses {dict(sorted(by_status.items()))}")
    assert not failures, "\n".join(f"{n} x {k}" for k, n in failures.items())
    assert len(CASES) >= MIN_CASES, len(CASES)
    assert {(o.method.upper(), o.path) for o in ops} <= {(m.upper(), p) for m, p, _ in CASES}


# Regression tests: one per failure the fuzz found, against the same server.
def documented(api_schema, method: str, path: str) -> set[str]:
    return set(api_schema.raw_schema["paths"][path][method]["responses"])


def test_unknown_feature_version_and_customer_are_documented_404s(server, api_schema):
    import httpx
    assert httpx.get(f"{server}/features/stats", params={"version": "c"}).status_code == 404
    assert httpx.get(f"{server}/features/nobody").status_code == 404
    assert "404" in documented(api_schema, "get", "/features/stats") & documented(api_schema, "get", "/features/{customer_id}")


def test_unreachable_weaviate_is_a_documented_503_not_a_malformed_422(server, api_schema):
    "It was `422` with a string `detail`, which contradicts FastAPI's documented 422 body (a list of field errors)."
    import httpx
    r = httpx.post(f"{server}/offers/retrieve", json={"query": "coffee", "backend": "weaviate"}, timeout=60)
    assert r.status_code == 503 and "backend" in r.json()["detail"], r.text
    assert {"404", "503"} <= documented(api_schema, "post", "/offers/retrieve")


def test_copy_without_llm_is_a_fast_documented_503(server, api_schema):
    "The fuzz relies on this: with the openai backend and no key, a pipeline run with copy answers 503 at once, never 500."
    import httpx
    cid = LoyaltyLensPipeline(SMOKE).sample_customers(1)[0]
    r = httpx.post(f"{server}/pipeline/{cid}", params={"copy": "true"}, timeout=60)
    assert r.status_code == 503 and "OPENAI_API_KEY" in r.json()["detail"], r.text
    assert "503" in documented(api_schema, "post", "/pipeline/{customer_id}")
    offer = httpx.post(f"{server}/offers/retrieve", json={"customer_id": cid}, timeout=60).json()["offers"][0]["offer_id"]
    r = httpx.post(f"{server}/copy/generate", json={"customer_id": cid, "offer_id": offer}, timeout=60)
    assert r.status_code == 503 and "OPENAI_API_KEY" in r.json()["detail"], r.text
    assert "503" in documented(api_schema, "post", "/copy/generate")
