"""The LoyaltyLens Streamlit dashboard: a thin view over `loyaltylens.llmops.dashboard_data` (notebook 05) and the live, trace and
feedback panels of `loyaltylens.observability` (notebook 07b).

Start it with `loyaltylens dashboard`. Every panel shows its data, or says what is absent and which command builds it."""
import time

import pandas as pd
import streamlit as st

from loyaltylens.llmops import dashboard_data
from loyaltylens.observability import feedback_panel, live_metrics, request_rates, trace_panel, waterfall

RATE_WINDOW_S = 1.0  # on the first view, the live panel scrapes twice this far apart to show request rates


def _absent(panel: dict) -> bool:
    "Show why a panel has no data; True when absent."
    if "absent" in panel: st.info(f"Absent — {panel['absent']}")
    return "absent" in panel


def main():
    st.set_page_config(page_title="LoyaltyLens LLMOps", layout="wide")
    st.title("LoyaltyLens LLMOps")
    d = dashboard_data()

    st.header("Active prompt")
    if not _absent(d["prompt"]):
        st.metric("active version", d["prompt"]["data"]["active"])
        st.dataframe(pd.DataFrame(d["prompt"]["data"]["history"]).iloc[::-1], hide_index=True)

    st.header("Latest evaluation")
    if not _absent(d["eval"]):
        e = d["eval"]["data"]["latest"]
        st.metric(f"gate score of {e['prompt_version']} ({e['n']} contexts)", f"{e['score']:.3f}",
                  delta=f"{'PASS' if e['passed'] else 'FAIL'} vs threshold {e['threshold']}", delta_color="normal" if e["passed"] else "inverse")
        st.dataframe(pd.DataFrame(dict(mean=e["criteria"], weight=e["weights"])).round(3))
        trend = pd.DataFrame(d["eval"]["data"]["trend"])
        st.subheader("Score trend")
        st.line_chart(trend.pivot_table(index="created_at", columns="prompt_version", values="score"))

    st.header("Drift per feature")
    if not _absent(d["drift"]):
        r = d["drift"]["data"]
        st.write(f"{r['baseline']} → {r['current']}: status **{r['status']}**")
        feats = pd.DataFrame(r["features"]).set_index("feature")
        st.bar_chart(feats["psi"])
        st.dataframe(feats[["psi", "status"]].round(4))

    st.header("Propensity model (MLflow registry)")
    if not _absent(d["model"]):
        m = d["model"]["data"]
        st.write(f"registered version {m['version']} (run {m['run_id']})")
        st.dataframe(pd.Series(m["metrics"], name="value"))

    feedback_section()
    live_section()
    trace_section()


def feedback_section(days: int = 7):
    st.header("Feedback trends")
    fb = feedback_panel(days)
    if _absent(fb): return
    f = fb["data"]
    cols = st.columns(3)
    cols[0].metric(f"judgements, last {days} days", f"{f['n']:,}")
    cols[1].metric("of them simulated", f"{f['n_simulated']:,}")
    cols[2].metric("mean rating (1-5)", f"{f['mean_rating']:.2f}")
    st.line_chart(pd.DataFrame(f["daily"]).set_index("day")[["mean_rating"]])
    st.dataframe(pd.DataFrame(f["by_prompt_version"]).rename(columns={"key": "prompt version"}), hide_index=True)
    if f["head_to_head"]: st.dataframe(pd.DataFrame(f["head_to_head"]), hide_index=True)


def live_section():
    st.header("Live metrics")
    live = live_metrics()
    if _absent(live): return
    earlier = st.session_state.get("scrape")
    if earlier is None or earlier["url"] != live["data"]["url"]:  # first view: a second scrape a moment later gives rates
        earlier = live["data"]
        time.sleep(RATE_WINDOW_S)
        if _absent(live := live_metrics(earlier["url"])): return
    now = st.session_state["scrape"] = live["data"]
    st.caption(f"{now['url']}: rates over the {now['scraped_at'] - earlier['scraped_at']:.1f} s since the previous scrape; rerun to refresh")
    cols = st.columns(2)
    cols[0].metric("copy requests queued", f"{now['copy_queue']:.0f}")
    cols[1].metric("copy queue wait p95", f"{now['copy_wait_p95_ms']:.0f} ms")
    st.subheader("Requests per second, by route")
    st.dataframe(request_rates(earlier, now).round(2))
    st.subheader("Pipeline stages, ms")
    if now["stages"].empty: st.info("Absent — no pipeline call yet: POST /pipeline/{customer_id}")
    else: st.dataframe(now["stages"].round(3))


def trace_section():
    st.header("Latest pipeline traces")
    tr = trace_panel()
    if _absent(tr): return
    calls = tr["data"]["calls"]
    st.dataframe(calls.round(3))
    pick = st.selectbox("trace", list(calls.index), format_func=lambda t: f"{t[:8]}…  {calls.loc[t, 'started']:%H:%M:%S}  {calls.loc[t, 'wall_ms']:.1f} ms")
    st.pyplot(waterfall(tr["data"]["spans"], pick).figure, clear_figure=True)


if __name__ == "__main__":  # streamlit runs the script as __main__; the leading "_" keeps the CLI and the app from importing it
    main()
