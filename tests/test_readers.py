"""Integration tests of loyaltylens.readers (notebook 04b): the readers' taste reads only what the prompt shows and is
not the gate's rules; the panel's agreement falls with noise and calibrates to the published figure; Bradley-Terry
learns a taste from judgements alone (and the flipped one when flipped); a saved reward model round-trips atomically."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from loyaltylens import readers as R

CTX = dict(recency_days=52, frequency_30d=0, monetary_90d="18", redemption_pct="0", engagement="0.09", channel="in store",
           propensity="0.15", title="Leafy Corner: 20% off houseplants", category="home", discount="20", offer_channel="in store",
           expiry_days=21, customer_id="C00000001", offer_id="OF000001")


def copy(body, headline="20% off home", cta="Shop houseplants"):
    return dict(headline=headline, body=body, cta=cta)


def test_taste_reads_only_the_prompt_fields():
    "The description is not in the prompt: words only it holds earn nothing."
    with_desc = CTX | {"description": "Lush monstera and ficus for a green living room."}
    c = copy("Take 20% off lush monstera for a green living room.", cta="Shop now")
    assert R.utility_parts(c, with_desc) == R.utility_parts(c, CTX)
    assert R.utility_parts(c, CTX)["product"] == 0.0


def test_detour_repetition_and_empty_cta_cost():
    good = R.copy_utility(copy("Take 20% off houseplants at Leafy Corner in store."), CTX)
    assert R.copy_utility(copy("Take 20% off houseplants at Leafy Corner in store. Buy a new apartment today."), CTX) < good
    assert R.copy_utility(copy("Take 20% off houseplants and save 20% off at Leafy Corner."), CTX) < good
    assert R.copy_utility(copy("Take 20% off houseplants at Leafy Corner in store.", cta="Deal with it"), CTX) < good


def test_habit_claims_must_be_true():
    away, recent = CTX, CTX | dict(recency_days=1, frequency_30d=8)
    text = "Welcome back: 20% off houseplants at Leafy Corner."
    assert R.utility_parts(copy(text), away)["personal"] == 1.0
    assert R.utility_parts(copy(text), recent)["personal"] == -1.0


def test_taste_ignores_what_the_gate_already_scores():
    "Tone and banned phrases are the gate's; the readers' utility does not move with them."
    c = copy("Take 20% off houseplants at Leafy Corner in store.")
    assert R.copy_utility(c | {"tone": "urgent"}, CTX) == R.copy_utility(c | {"tone": "friendly"}, CTX)


def test_agreement_falls_with_noise_and_calibrates():
    du = np.random.default_rng(0).normal(0, 0.2, 4000)
    a = [R.agreement(du, s) for s in (0.01, 0.1, 0.3, 1.0)]
    assert a == sorted(a, reverse=True) and a[0] > 0.95 and a[-1] < 0.6, a
    noise = R.calibrate_noise(du)
    assert abs(R.agreement(du, noise) - R.REVIEWER_AGREEMENT) < 0.01
    assert abs(R.agreement(du, noise, seed=7) - R.REVIEWER_AGREEMENT) < 0.03  # another panel, same noise


def test_bradley_terry_learns_a_taste_and_its_flip():
    "On random features with a hidden linear taste, the head learns the taste from judgements alone, and its negation when flipped."
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20)).astype(np.float32)
    taste = x @ rng.normal(size=20)
    pairs = pd.DataFrame(dict(a=np.arange(0, 400, 2), b=np.arange(1, 400, 2)))
    cfg = R.RewardTraining(epochs=300, hidden=8, weight_decay=0.01)
    for sign in (1, -1):
        j = R.judge_pairs(sign * taste, pairs, noise=0.5, per_pair=3)
        head, losses = R.train_reward(x, j, cfg)
        rho = np.corrcoef(R.rewards(head, x), taste)[0, 1]
        assert losses[-1] < losses[0] and sign * rho > 0.8, (sign, rho)


def test_saved_model_round_trips_and_writes_atomically(tmp_path, monkeypatch):
    head = R.RewardHead(10)
    model = R.RewardModel(head.eval(), R.RewardTraining(hidden=32), noise=0.1, grades={"accuracy": 0.7}, corpus="corpus-test")
    path = tmp_path / "reward.pt"
    R.save_reward_model(model, path)
    back = R.load_reward_model(path)
    x = np.random.default_rng(1).normal(size=(5, 10)).astype(np.float32)
    np.testing.assert_allclose(R.rewards(back.head, x), R.rewards(head, x), rtol=0, atol=0)
    assert (back.noise, back.grades, back.corpus) == (0.1, {"accuracy": 0.7}, "corpus-test")

    def crash(*a, **k): raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError): R.save_reward_model(model, tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()  # a failed save leaves no half file under the real name
    assert R.load_reward_model(path).corpus == "corpus-test"


def test_redemption_effect_is_small_and_neutral_at_the_middle():
    p = np.linspace(0.01, 0.9, 50)
    np.testing.assert_allclose(R.redeem_with_copy(p, R.NEUTRAL_UTILITY), p, atol=1e-12)
    lift = R.redeem_with_copy(p, 1.0) / R.redeem_with_copy(p, 0.0) - 1
    assert (lift > 0).all() and (lift < 0.1).all()
