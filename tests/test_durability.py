"""Durability suite (issue 16): a process SIGKILLed in the middle of a write leaves every store readable and
consistent. The suite, in one place:

- the feature store: `tests/test_features.py::test_killed_writer_leaves_only_complete_versions` (module 1) — a writer
  killed at several moments leaves only complete versions;
- the feedback store: `tests/test_feedback_durability.py` (module 6) — SIGKILL of the API server and of PostgreSQL
  mid-load loses no acknowledged judgement and stores none twice;
- the prompt registry (below, new): a process killed during `prompt activate` leaves `active.yaml` valid, its active
  version the last entry of a history that only ever grows by whole entries.

Run the whole suite: `pytest tests/test_durability.py tests/test_feedback_durability.py
tests/test_features.py -k "kill or sigkill or durab"`. `test_the_suite_is_all_here` fails if one of the referenced
tests is renamed or removed."""
import ast, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path

import yaml

from loyaltylens.generation import PromptRegistry

KILLS = 12  # SIGKILLs per run, each at a different moment of a stream of activations
MAX_DELAY_S = 0.25  # the latest kill, after the child's first activation is under way
SUITE = {"test_features.py": ["test_killed_writer_leaves_only_complete_versions"],
         "test_feedback_durability.py": ["test_sigkill_api_server_mid_load", "test_sigkill_postgres_mid_load_then_restart"]}

ACTIVATOR = """
import sys
from loyaltylens.generation import PromptRegistry
reg, versions = PromptRegistry(sys.argv[1]), sys.argv[2:]
print("ready", flush=True)
i = 0
while True:  # activate, activate, ... until killed
    reg.activate(versions[i % len(versions)], by="durability-test", reason=f"activation {i}"); i += 1
"""


def check_registry(root: Path, before: list[dict]) -> int:
    "active.yaml parses and validates, its active version is the last in its history, the old history is a prefix of the new; returns the new entries."
    reg = PromptRegistry(root)
    history = [h.model_dump() for h in reg.history()]  # raises PromptError on a truncated or invalid file
    assert history[:len(before)] == before, "the history before the kill was rewritten"
    assert reg.active_version() == history[-1]["version"], (reg.active_version(), history[-1])
    reasons = [h["reason"] for h in history[len(before):]]
    assert reasons == [f"activation {i}" for i in range(len(reasons))], reasons  # whole entries, in order, none lost mid-way
    return len(reasons)


def kill_during_activations(root: Path, delay: float) -> int:
    "Start a child activating versions of `root` in a loop; SIGKILL it `delay` s after it is ready. Returns its return code."
    versions = [v for v in PromptRegistry(root).versions()][:2]
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATOR, str(root), *versions], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL); proc.wait()
    return proc.returncode


def test_killed_prompt_activation_leaves_a_valid_active_yaml(tmp_path, root):
    prompts = tmp_path / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    before = [h.model_dump() for h in PromptRegistry(prompts).history()]
    rng, outcomes = random.Random(16), []
    for i in range(KILLS):
        delay = MAX_DELAY_S * i / (KILLS - 1) + rng.uniform(0, 0.01)  # spread over the run, jittered: different moments
        rc = kill_during_activations(prompts, delay)
        assert rc == -signal.SIGKILL, f"the child ended by itself ({rc}) before the kill"
        added = check_registry(prompts, before)
        before = [h.model_dump() for h in PromptRegistry(prompts).history()]  # the next kill must keep this one's result
        outcomes.append(added)
    t = time.perf_counter()
    PromptRegistry(prompts).activate("v1", by="durability-test", reason="after the kills")  # the lock a killed child held is free
    assert time.perf_counter() - t < 5
    leftovers = sorted(p.name for p in prompts.glob(".active.yaml.*.tmp"))
    print(f"\nprompt activate: {KILLS} SIGKILLs, activations completed before each kill: {outcomes}; temp files left: {len(leftovers)}")
    assert sum(outcomes) > 0, "no kill happened after an activation: the test did not exercise writes"


def test_killed_cli_activation_leaves_a_valid_active_yaml(tmp_path, root):
    "The CLI path: `loyaltylens prompt activate` on a copy of prompts/ (LOYALTYLENS_PROMPTS_DIR), killed mid-way or after."
    prompts = tmp_path / "prompts"
    shutil.copytree(root / "prompts", prompts, ignore=shutil.ignore_patterns("*.lock"))
    before = [h.model_dump() for h in PromptRegistry(prompts).history()]
    proc = subprocess.Popen([sys.executable, "-c", "from loyaltylens.core import main; main()", "prompt", "activate", "v1",
                             "--note", "activation 0"], env={**os.environ, "LOYALTYLENS_PROMPTS_DIR": str(prompts)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (proc.poll() is not None or any(prompts.glob(".active.yaml.*")) or "active: v1" in (prompts / "active.yaml").read_text()):
        time.sleep(0.001)  # until the write is under way (its temp file exists) or done
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert check_registry(prompts, before) in (0, 1)


def test_the_suite_is_all_here(root):
    "The durability tests this module references still exist under these names."
    for file, names in SUITE.items():
        defined = {n.name for n in ast.walk(ast.parse((root / "tests" / file).read_text())) if isinstance(n, ast.FunctionDef)}
        assert set(names) <= defined, (file, set(names) - defined)
