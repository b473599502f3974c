"""How the copies of `fact_labels.jsonl` were written: the golden set's contexts (golden.jsonl), three ways, with nothing
filtered for facts. Run once; the JSONL is committed with `spans: null` on every row, then labelled by hand (see
README.md). It refuses to overwrite a labelled file.

    LOYALTYLENS_LLM_THREADS=1 nice -n 10 .venv/bin/python data/golden/make_fact_labels.py

Routes:
- fast: `write_copy(route="fast", check_facts=False, max_attempts=1)` — the serving decoder, one attempt, no retry.
- gbnf: `write_copy(route="gbnf", check_facts=False, max_attempts=1)` — the GBNF grammar, one attempt, no retry.
- unconstrained: the few-shot prompt completed by the same model (the packaged Gemma with the copy vocabulary, llama-cpp-python's
  plain completion) with no grammar and no fact rules, a little hotter than the prompt asks; kept only when `check_copy`
  accepts it (copy JSON within the word limits, naming the offer).

Two processes (one model and one thread each) write the decoded and the unconstrained copies. Every job's result is
appended to a `.part` file as it finishes, so an interrupted run resumes where it stopped with the same output (each
job has its own seed); the part files are removed when the JSONL is written.
"""
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from loyaltylens.generation import (MIN_P, RETRY_TEMPERATURE_STEP, TOP_K, TOP_P, GenerationError, PromptRegistry, check_copy,
                                    few_shot_prompt, load_decoder, prompt_context, write_copy)

HERE = Path(__file__).parent
DECODED_VERSIONS = ("v1", "v2")  # the fast route alternates between the serving prompts
GBNF_EVERY = 4  # the GBNF route (seconds a copy) writes, by v1, for every fourth context
FREE_VERSIONS = ("v1", "v2", "v3-pushy")  # unconstrained sampling adds the prompt that asks for invention
FREE_PER_VERSION = 30  # unconstrained samples kept per prompt (contexts in order, round after round)
ROUTES = ("fast", "gbnf", "unconstrained")  # row order within a context
SEED = 21


def copy_row(i: int, route: str, version: str, case: dict, copy: dict, seed: int) -> dict:
    "One candidate copy with its context stored whole; `spans` is filled by the labeller."
    return dict(id=f"F{i:03d}", route=route, prompt_version=version, case_id=case["id"], seed=seed,
                offer=case["offer"], customer=case["customer"], propensity=case["propensity"],
                **{k: copy[k] for k in ("headline", "body", "cta", "tone")}, spans=None)


def decoded(case: dict, route: str, version: str, seed: int) -> dict | None:
    "One copy by a decoding route, one attempt, no fact filter; None when it is not valid copy."
    try: c = write_copy(case["customer"], case["propensity"], case["offer"], version=version, backend="local",
                        max_attempts=1, seed=seed, route=route, check_facts=False)
    except GenerationError: return None
    return c.model_dump()


def unconstrained(case: dict, version: str, seed: int) -> dict | None:
    "One plain completion of the few-shot prompt (no grammar, no fact rules); None unless it parses as valid copy."
    prompt = PromptRegistry().get(version)
    ctx = prompt_context(case["customer"], case["propensity"], case["offer"])
    out = load_decoder().llm.create_completion(few_shot_prompt(prompt, ctx), max_tokens=prompt.max_tokens, seed=seed, stop=["\n"],
                                               temperature=prompt.temperature + RETRY_TEMPERATURE_STEP, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P)
    try: return check_copy(out["choices"][0]["text"].strip(), prompt, ctx).model_dump()
    except ValueError: return None


def decoded_jobs(cases: list[dict]):
    "(route, version, case, seed): the fast route for every context (v1 and v2 in turn), the GBNF route by v1 for every fourth."
    jobs = [("fast", DECODED_VERSIONS[k % 2], case, SEED + 10 * k + 5) for k, case in enumerate(cases)]
    jobs += [("gbnf", "v1", case, SEED + 10 * k + 6) for k, case in enumerate(cases) if k % GBNF_EVERY == 0]
    return sorted(jobs, key=lambda j: j[:2])  # one prompt version after another: the model keeps its few-shot prefix evaluated


def free_jobs(cases: list[dict], version: str):
    "(route, version, case, seed): unconstrained samples by one prompt for every context, round after round with new seeds."
    j = FREE_VERSIONS.index(version)
    for rnd in itertools.count():
        for k, case in enumerate(cases): yield "unconstrained", version, case, SEED + 1000 * rnd + 10 * k + j


def run(job, done: dict, log: Path):
    "A job's copy (None: not valid copy), from an earlier run's part file when it has one."
    route, version, case, seed = job
    key = f"{route}/{version}/{case['id']}/{seed}"
    if key not in done:
        done[key] = unconstrained(case, version, seed) if route == "unconstrained" else decoded(case, route, version, seed)
        with log.open("a") as fh: fh.write(json.dumps(dict(key=key, copy=done[key]), ensure_ascii=False) + "\n")
    return done[key]


def write_part(part: str) -> list[tuple]:
    "Run one part in this process: `decoded` (all its jobs) or `unconstrained` (until FREE_PER_VERSION copies per prompt)."
    cases = [json.loads(line) for line in (HERE / "golden.jsonl").open()]
    log = HERE / f"fact_labels.{part}.part"
    done = {r["key"]: r["copy"] for r in map(json.loads, log.open())} if log.exists() else {}
    kept = []
    if part == "decoded":
        for job in tqdm(decoded_jobs(cases), desc=part, position=1):
            if (copy := run(job, done, log)) is not None: kept.append((*job, copy))
        return kept
    with tqdm(total=FREE_PER_VERSION * len(FREE_VERSIONS), desc=part) as bar:
        for version in FREE_VERSIONS:
            n = 0
            for job in free_jobs(cases, version):
                if (copy := run(job, done, log)) is None: continue
                kept.append((*job, copy)); n += 1; bar.update()
                if n == FREE_PER_VERSION: break
    return kept


def main(out: Path = HERE / "fact_labels.jsonl"):
    if out.exists() and any(json.loads(line)["spans"] is not None for line in out.open()):
        sys.exit(f"{out} has hand labels: not overwriting them")
    with ProcessPoolExecutor(2) as pool:  # one model per process, one thread each (LOYALTYLENS_LLM_THREADS=1)
        parts = list(pool.map(write_part, ["unconstrained", "decoded"]))
    order = {json.loads(line)["id"]: i for i, line in enumerate((HERE / "golden.jsonl").open())}
    kept = sorted((k for part in parts for k in part), key=lambda k: (order[k[2]["id"]], ROUTES.index(k[0]), k[3]))
    with out.open("w") as fh:
        for i, (route, version, case, seed, copy) in enumerate(kept):
            fh.write(json.dumps(copy_row(i, route, version, case, copy, seed), ensure_ascii=False) + "\n")
    for part in HERE.glob("fact_labels.*.part"): part.unlink()
    print(f"wrote {len(kept)} copies to {out}: " + ", ".join(f"{r} {sum(k[0] == r for k in kept)}" for r in ROUTES))


if __name__ == "__main__":
    main()
