"""How `golden.jsonl` was made: contexts drawn from the SMOKE world's test-month snapshot, reference copies written
from the hand-written brand-voice sentences below (see README.md). Run once; the JSONL is committed as data.

    .venv/bin/python data/golden/make_golden.py
"""
import json
from pathlib import Path

import numpy as np

from loyaltylens.features import CHANNELS, FEATURE_COLUMNS, default_store, default_world
from loyaltylens.propensity import default_model, predict

SNAPSHOT = "m10-2024-11-01"  # the propensity model's test month
PER_SEGMENT = 16  # contexts per customer segment: 3 x 16 = 48
URGENT_MAX_DAYS = 7  # v2's rule: urgent only when the offer ends within a week
WHERE = {"mobile": "in the app", "web": "online", "in_store": "in store"}
CTA = {"mobile": "Open the app", "web": "Shop online", "in_store": "Visit a store"}

# Hand-written in the voice of data/brand/guide.yaml: thank, name the real offer plainly, invite; no pressure;
# second person only (module 4's fact_check flags the brand's first person).
HEADLINES = {
    "friendly": ["{d}% off {cat}, saved for you", "{d}% off {cat} for your next visit", "{d}% off {cat}, a small thank-you"],
    "exclusive": ["{d}% off {cat}, just for members", "{d}% off {cat} for loyal regulars", "{d}% off {cat}, a members' thank-you"],
    "urgent": ["{d}% off {cat}, ending in {n} days", "{d}% off {cat}, {n} days left", "{d}% off {cat} until this week ends"],
}
BODIES = {
    "friendly": ["{d}% off {product} at {brand} is saved for you. Use it {where} any time in the next {n} days.",
                 "It has been a while, so here is {d}% off {product} at {brand}, {where}, for the next {n} days.",
                 "A small thank-you for being a member: {d}% off {product} at {brand}. Redeem it {where} within {n} days."],
    "exclusive": ["As one of the most loyal members, enjoy {d}% off {product} at {brand} {where} for the next {n} days.",
                  "Thanks for shopping so often. Take {d}% off {product} at {brand}, {where}, within {n} days.",
                  "Your loyalty pays off: {d}% off {product} at {brand}, just for members, {where} for {n} days."],
    "urgent": ["Your {d}% off {product} at {brand} ends in {n} days. Redeem it {where} before then.",
               "There are {n} days left to take {d}% off {product} at {brand} {where}.",
               "A reminder that {d}% off {product} at {brand} closes in {n} days. It is waiting for you {where}."],
}


def segment(row) -> str:
    "loyal: seen in the last week and 4+ purchases in 30 days; lapsed: no event for over 30 days; else regular."
    if row["recency_days"] <= 7 and row["frequency_30d"] >= 4: return "loyal"
    return "lapsed" if row["recency_days"] > 30 else "regular"


def reference(ctx: dict, k: int) -> dict:
    "The reference copy of one context, k-th phrasing."
    o = ctx["offer"]
    brand, product = o["title"].split(":")[0].strip(), o["title"].split("% off", 1)[1].strip()
    tone = "urgent" if o["expiry_days"] <= URGENT_MAX_DAYS and k % 2 == 0 else ("exclusive" if ctx["segment"] == "loyal" else "friendly")
    f = dict(d=f"{o['discount_pct']:g}", cat=o["category"], n=o["expiry_days"], product=product, brand=brand, where=WHERE[o["channel"]])
    return dict(headline=HEADLINES[tone][k % 3].format(**f), body=BODIES[tone][k % 3].format(**f), cta=CTA[o["channel"]], tone=tone)


def main(out: Path = Path(__file__).with_name("golden.jsonl"), seed: int = 5):
    rng = np.random.default_rng(seed)
    store = default_store(smoke=True)
    feats = store.get_many([f"C{i:08d}" for i in range(2_000)], SNAPSHOT)
    feats["segment"] = feats.apply(segment, axis=1)
    offers = default_world(smoke=True).load_offers()
    short, long_ = offers[offers.expiry_days <= URGENT_MAX_DAYS], offers[offers.expiry_days > URGENT_MAX_DAYS]
    rows = []
    for seg in ["loyal", "regular", "lapsed"]:
        pool = feats[feats.segment == seg]
        for i in range(PER_SEGMENT):  # cycle the customer's channel, the offer's channel and short/long expiry
            ch = CHANNELS[i % 3]
            cand = pool[pool.channel_preference == ch]
            cust = (cand if len(cand) else pool).sample(1, random_state=int(rng.integers(1 << 31))).iloc[0]
            pool = pool.drop(cust.name)
            src = short if i % 3 == 0 else long_
            oc = src[src.channel == CHANNELS[(i + seg.__len__()) % 3]]
            offer = (oc if len(oc) else src).sample(1, random_state=int(rng.integers(1 << 31))).iloc[0]
            rows.append(dict(customer={"customer_id": cust.customer_id, **{c: cust[c] for c in FEATURE_COLUMNS}},
                             offer=offer.to_dict(), segment=seg))
    import pandas as pd
    p = predict(pd.DataFrame([r["customer"] for r in rows])[FEATURE_COLUMNS], model=default_model(smoke=True))
    with out.open("w") as fh:
        for k, (r, pk) in enumerate(zip(rows, p)):
            r = dict(id=f"G{k:03d}", snapshot=SNAPSHOT, propensity=round(float(pk), 4), **r)
            r["reference"] = reference(r, k)
            fh.write(json.dumps(r, default=lambda x: x.item() if hasattr(x, "item") else str(x)) + "\n")
    print(f"wrote {len(rows)} contexts to {out}")


if __name__ == "__main__":
    main()
