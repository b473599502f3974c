"""API fuzzing: schemathesis generates requests from `/openapi.json` of `loyaltylens serve`, running as a real process
on loopback over the SMOKE world with an API token set and the local LLM backend, and applies every one of its checks:
nothing answers >= 500 except a documented 503, every response (status, headers, body) is one the schema documents,
and the schema's security is what the app enforces (schemathesis' `ignored_auth` sends guarded requests without the
token). Generated copy requests rarely name a real customer and offer, so explicit cases with real ones follow, and the
number of cases that reached the copy decoder is reported. State-changing routes write to a copy of `prompts/` and to a
feedback schema of this test only."""
import re, shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
import schemathesis.specs.openapi.checks  # noqa: F401 -- registers the OpenAPI checks
from schemathesis.checks import CHECKS as REGISTERED_CHECKS, not_a_server_error

from loyaltylens import features as fs, propensity as prop, retrieval as ret
from loyaltylens.generation import copy_gguf_path
from loyaltylens.pipeline import LoyaltyLensPipeline, serve_process, stop_process

SMOKE = True  # the small world: the API's contract does not depend on the world's size
EXAMPLES_PER_OPERATION = 90  # 17 operations; some have fewer distinct inputs than this, so the run sends ~1,200 cases (the floor is 1,000)
MIN_CASES = 1000  # the floor for one run
DECODER_CASES = 6  # explicit copy and pipeline cases with real customers and offers (each ~1 s of generation)
TOKEN = "fuzz-token-5d2a"  # a made-up API token: the fuzz runs with one set
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def no_server_error_but_documented_503(ctx, response, case):
    """schemathesis' `not_a_server_error`, except a 503 the operation documents (a missing artefact or an unconfigured LLM:
    the project's rule, the message names the command that fixes it; `status_code_conformance` checks it is documented)."""
    if response.status_code == 503 and "503" in case.operation.definition.raw.get("responses", {}): return True
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error_but_documented_503, *(c for c in REGISTERED_CHECKS.get_all() if c is not not_a_server_error)]  # every check
FUZZ_FEEDBACK_SCHEMA = "fuzz_feedback"  # PostgreSQL schema the fuzzed POST /feedback writes to (not the shared one)

CASES: list[tuple[str, str, int]] = []  # (method, path, status) of every case sent, for the count and the report
DECODED: list[str] = []  # paths of the cases whose answer carries copy the decoder wrote


@pytest.fixture(scope="module")
def server(tmp_path_factory, root):
    "`loyaltylens serve` over the SMOKE artefacts (built first, as `loyaltylens pipeline prepare --smoke` does), token set, local LLM."
    fs.default_store(SMOKE); prop.default_model(SMOKE); ret.serving_retriever("pgvector", SMOKE); copy_gguf_path()
    prompts = tmp_path_factory.mktemp("fuzz") / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    proc, url = serve_process({"LOYALTYLENS_SMOKE": "1", "LOYALTYLENS_PROMPTS_DIR": str(prompts),
                               "LOYALTYLENS_FEEDBACK_SCHEMA": FUZZ_FEEDBACK_SCHEMA, "LOYALTYLENS_API_TOKEN": TOKEN,
                               "LOYALTYLENS_CORS_ORIGINS": "", "LOYALTYLENS_LLM_BACKEND": "local"}, timeout=300)
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


def send(operation, case, failures: dict[str, int]):
    "Send one case with the token and every check; a failed check is counted by kind (the run goes on)."
    try:
        response = case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=120)
        CASES.append((case.method, case.path, response.status_code))
        if response.status_code == 200 and case.method.upper() == "POST" and case.path in ("/copy/generate", "/pipeline/{customer_id}"):
            body = response.json()
            if "headline" in body or body.get("copy"): DECODED.append(case.path)
    except (Exception, BaseExceptionGroup) as e:  # a failed check: record it with the request that caused it and keep fuzzing
        CASES.append((case.method, case.path, -1))
        kind = failure_kind(operation, e).split("; e.g.")[0]
        if kind not in failures: print(failure_kind(operation, e))
        failures[kind] = failures.get(kind, 0) + 1


def fuzz_operation(operation) -> dict[str, int]:
    "Send EXAMPLES_PER_OPERATION generated requests to one operation; {distinct failure: how many cases}."
    failures = {}

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case): send(operation, case, failures)
    run()
    return failures


def decoder_cases(ops) -> dict[str, int]:
    "Explicit cases with real customers and offers, so copy reaches the local decoder: /copy/generate and /pipeline with copy."
    pl, failures = LoyaltyLensPipeline(SMOKE, precompute="load"), {}
    ids, offers = pl.sample_customers(DECODER_CASES, seed=11), sorted(pl._offers)
    by = {(o.method.upper(), o.path): o for o in ops}
    for i, cid in enumerate(ids):
        copy_op, pipe_op = by[("POST", "/copy/generate")], by[("POST", "/pipeline/{customer_id}")]
        send(copy_op, copy_op.Case(body={"customer_id": cid, "offer_id": offers[(5 * i) % len(offers)]}, media_type="application/json"), failures)
        send(pipe_op, pipe_op.Case(path_parameters={"customer_id": cid}, query={"copy": "true"}), failures)
    return failures


def test_fuzz_every_operation(api_schema):
    "Every operation, >= 1,000 cases in all: no 5xx, every status and body as documented."
    ops = [r.ok() for r in api_schema.get_all_operations()]
    failures = {k: n for op in ops for k, n in fuzz_operation(op).items()}
    failures |= decoder_cases(ops)
    by_status = {}
    for _, _, s in CASES: by_status[s] = by_status.get(s, 0) + 1
    print(f"fuzz: {len(CASES)} cases over {len(ops)} operations, every schemathesis check, token set; {len(DECODED)} reached the copy decoder; "
          f"statuses {dict(sorted(by_status.items()))}")
    assert not failures, "\n".join(f"{n} x {k}" for k, n in failures.items())
    assert len(CASES) >= MIN_CASES, len(CASES)
    assert len(DECODED) >= DECODER_CASES, DECODED
    assert {(o.method.upper(), o.path) for o in ops} <= {(m.upper(), p) for m, p, _ in CASES}


# Regression tests: one per failure the fuzz found, against the same server.
def documented(api_schema, method: str, path: str) -> set[str]:
    return set(api_schema.raw_schema["paths"][path][method]["responses"])


def test_unknown_feature_version_and_customer_are_documented_404s(server, api_schema):
    import httpx
    assert httpx.get(f"{server}/features/stats", params={"version": "c"}).status_code == 404
    assert httpx.get(f"{server}/features/nobody", headers=AUTH).status_code == 404
    assert "404" in documented(api_schema, "get", "/features/stats") & documented(api_schema, "get", "/features/{customer_id}")


def test_unreachable_weaviate_is_a_documented_503_not_a_malformed_422(server, api_schema):
    "It was `422` with a string `detail`, which contradicts FastAPI's documented 422 body (a list of field errors)."
    import httpx
    r = httpx.post(f"{server}/offers/retrieve", json={"query": "coffee", "backend": "weaviate"}, headers=AUTH, timeout=60)
    assert r.status_code == 503 and "backend" in r.json()["detail"], r.text
    assert {"404", "503"} <= documented(api_schema, "post", "/offers/retrieve")
