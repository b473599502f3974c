"""The LoyaltyLens Streamlit dashboard: a thin view over `loyaltylens.llmops.dashboard_data` (notebook 05).

Start it with `loyaltylens dashboard`. Every panel shows its data, or says what is absent and which command builds it."""
import pandas as pd
import streamlit as st

from loyaltylens.llmops import dashboard_data


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

    st.header("Feedback trends")
    if not _absent(d["feedback"]):
        st.dataframe(pd.DataFrame(d["feedback"]["data"]))


if __name__ == "__main__":  # streamlit runs the script as __main__; the leading "_" keeps the CLI and the app from importing it
    main()
