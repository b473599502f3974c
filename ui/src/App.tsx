import { useCallback, useEffect, useState } from "react";
import { Choice, Copy, Pair, Stats, Stored, newKey, nextPair, stats, submit } from "./api";

const STARS = [1, 2, 3, 4, 5];
const TREND_DAYS = 7; // the trends view shows the last week, like the stats endpoint's default

type Status = { kind: "idle" } | { kind: "saving" } | { kind: "saved"; record: Stored } | { kind: "error"; message: string };

function Stars({ side, value, onChange }: { side: "A" | "B"; value: number; onChange: (v: number) => void }) {
  return (
    <fieldset className="stars">
      <legend>Rating of copy {side}</legend>
      {STARS.map((s) => (
        <label key={s} className={s <= value ? "on" : ""}>
          <input type="radio" name={`rating-${side}`} value={s} checked={value === s} onChange={() => onChange(s)}
            aria-label={`Copy ${side}: ${s} star${s > 1 ? "s" : ""}`} />
          ★
        </label>
      ))}
    </fieldset>
  );
}

function CopyCard({ side, copy }: { side: "A" | "B"; copy: Copy }) {
  return (
    <article className="copy" aria-label={`Copy ${side}`}>
      <h3>Copy {side}</h3>
      <p className="headline">{copy.headline}</p>
      <p>{copy.body}</p>
      <p className="cta">{copy.cta}</p>
    </article>
  );
}

function Facts({ title, facts }: { title: string; facts: Record<string, string | number> }) {
  return (
    <section className="facts" aria-label={title}>
      <h3>{title}</h3>
      <dl>
        {Object.entries(facts).map(([k, v]) => (
          <div key={k}><dt>{k.replace(/_/g, " ")}</dt><dd>{String(v)}</dd></div>
        ))}
      </dl>
    </section>
  );
}

function RateView({ reviewer, token }: { reviewer: string; token: string }) {
  const [pair, setPair] = useState<Pair | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  const [choice, setChoice] = useState<Choice | null>(null);
  const [ratingA, setRatingA] = useState(0);
  const [ratingB, setRatingB] = useState(0);
  const [comment, setComment] = useState("");
  const [key, setKey] = useState(newKey()); // one key per pair: a retried submit is stored once
  const [status, setStatus] = useState<Status>({ kind: "idle" });

  const load = useCallback(async () => {
    setLoadError(null);
    setStatus({ kind: "idle" });
    try {
      setPair(await nextPair(reviewer));
      setChoice(null); setRatingA(0); setRatingB(0); setComment(""); setKey(newKey());
    } catch (e) {
      setLoadError((e as Error).message);
    }
  }, [reviewer]);
  useEffect(() => { void load(); }, [load]);

  const ready = pair !== null && choice !== null && ratingA > 0 && ratingB > 0 && reviewer.trim() !== "";
  const send = useCallback(async () => {
    if (!pair || !ready || status.kind === "saving") return;
    setStatus({ kind: "saving" });
    try {
      const record = await submit({ pair_id: pair.pair_id, reviewer: reviewer.trim(), choice: choice!, rating_a: ratingA,
        rating_b: ratingB, comment: comment.trim() || null, idempotency_key: key }, token);
      setStatus({ kind: "saved", record });
    } catch (e) {
      setStatus({ kind: "error", message: (e as Error).message });
    }
  }, [pair, ready, status.kind, reviewer, choice, ratingA, ratingB, comment, key, token]);

  useEffect(() => {
    const onKey = (e: KeyboardEvent) => {
      const typing = e.target instanceof HTMLElement && ["INPUT", "TEXTAREA"].includes(e.target.tagName) && (e.target as HTMLInputElement).type !== "radio";
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); void send(); return; }
      if (typing || e.altKey || e.ctrlKey || e.metaKey) return;
      const digit = /^Digit([1-5])$/.exec(e.code);
      if (digit) { (e.shiftKey ? setRatingB : setRatingA)(Number(digit[1])); return; }
      const k = e.key.toLowerCase();
      if (k === "a") setChoice("A");
      else if (k === "b") setChoice("B");
      else if (k === "t") setChoice("tie");
      else if (k === "n") void load();
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, [send, load]);

  if (loadError) return (
    <div role="alert" className="error">
      <p>Could not load a pair: {loadError}</p>
      <button onClick={() => void load()}>Try again</button>
    </div>
  );
  if (!pair) return <p role="status">Loading a pair…</p>;
  return (
    <form onSubmit={(e) => { e.preventDefault(); void send(); }} aria-label="Rate two offer copies">
      <div className="facts-row">
        <Facts title="Customer" facts={pair.customer} />
        <Facts title="Offer" facts={pair.offer} />
      </div>
      <div className="copies">
        <div><CopyCard side="A" copy={pair.a} /><Stars side="A" value={ratingA} onChange={setRatingA} /></div>
        <div><CopyCard side="B" copy={pair.b} /><Stars side="B" value={ratingB} onChange={setRatingB} /></div>
      </div>
      <fieldset className="choice">
        <legend>Which copy is better?</legend>
        {([["A", "A is better"], ["B", "B is better"], ["tie", "Tie"]] as const).map(([v, label]) => (
          <label key={v}>
            <input type="radio" name="choice" value={v} checked={choice === v} onChange={() => setChoice(v)} /> {label}
          </label>
        ))}
      </fieldset>
      <label className="comment">
        Comment (optional)
        <textarea value={comment} maxLength={2000} onChange={(e) => setComment(e.target.value)} rows={3} />
      </label>
      <div className="actions">
        <button type="submit" disabled={!ready || status.kind === "saving" || status.kind === "saved"}>Submit rating</button>
        <button type="button" onClick={() => void load()}>Next pair</button>
      </div>
      {status.kind === "saved" && <p role="status" className="ok">Saved as feedback #{status.record.id}. Press N for the next pair.</p>}
      {status.kind === "error" && <p role="alert" className="error">Not saved: {status.message}. Your answers are kept; submit again to retry.</p>}
      <p className="help">Shortcuts: A / B / T choose, 1–5 rate A, Shift+1–5 rate B, Ctrl+Enter submit, N next pair.</p>
    </form>
  );
}

function Bars({ daily }: { daily: Stats["daily"] }) {
  const max = Math.max(1, ...daily.map((d) => d.n));
  const w = 40, h = 120;
  return (
    <svg role="img" aria-label="Ratings per day" width={daily.length * (w + 8)} height={h + 40}>
      {daily.map((d, i) => {
        const bh = (d.n / max) * h;
        return (
          <g key={d.day} transform={`translate(${i * (w + 8)},0)`}>
            <rect y={h - bh} width={w} height={bh} className="bar"><title>{`${d.day}: ${d.n} ratings, mean ${d.mean_rating?.toFixed(2) ?? "–"}`}</title></rect>
            <text x={w / 2} y={h + 14} textAnchor="middle">{d.day.slice(5)}</text>
            <text x={w / 2} y={h + 30} textAnchor="middle">{d.mean_rating?.toFixed(1) ?? "–"}★</text>
          </g>
        );
      })}
    </svg>
  );
}

function TrendsView() {
  const [data, setData] = useState<Stats | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => { stats(TREND_DAYS).then(setData, (e: Error) => setError(e.message)); }, []);
  if (error) return <p role="alert" className="error">Could not load the trends: {error}</p>;
  if (!data) return <p role="status">Loading trends…</p>;
  const fmt = (x: number | null) => (x === null ? "–" : x.toFixed(2));
  return (
    <section aria-label={`Trends of the last ${data.days} days`}>
      <p>{data.n} ratings since {data.since.slice(0, 10)} ({data.n_simulated} from simulated reviewers), mean {fmt(data.mean_rating)} stars.</p>
      <Bars daily={data.daily} />
      <table>
        <caption>Mean rating per prompt version</caption>
        <thead><tr><th>prompt version</th><th>ratings</th><th>mean</th></tr></thead>
        <tbody>{data.by_prompt_version.map((g) => <tr key={g.key}><td>{g.key}</td><td>{g.n}</td><td>{fmt(g.mean_rating)}</td></tr>)}</tbody>
      </table>
      <table>
        <caption>Head-to-head win rates</caption>
        <thead><tr><th>version</th><th>against</th><th>wins</th><th>losses</th><th>ties</th><th>win rate</th></tr></thead>
        <tbody>{data.head_to_head.map((r) => (
          <tr key={`${r.version}-${r.opponent}`}><td>{r.version}</td><td>{r.opponent}</td><td>{r.wins}</td><td>{r.losses}</td><td>{r.ties}</td><td>{fmt(r.win_rate)}</td></tr>
        ))}</tbody>
      </table>
    </section>
  );
}

export default function App() {
  const [view, setView] = useState<"rate" | "trends">("rate");
  const [reviewer, setReviewer] = useState(() => localStorage.getItem("reviewer") ?? "");
  const [token, setToken] = useState(() => sessionStorage.getItem("token") ?? "");
  useEffect(() => { localStorage.setItem("reviewer", reviewer); }, [reviewer]);
  useEffect(() => { sessionStorage.setItem("token", token); }, [token]);
  return (
    <main>
      <header>
        <h1>LoyaltyLens — which offer copy is better?</h1>
        <nav aria-label="Views">
          <button aria-pressed={view === "rate"} onClick={() => setView("rate")}>Rate</button>
          <button aria-pressed={view === "trends"} onClick={() => setView("trends")}>7-day trends</button>
        </nav>
        <label>Reviewer <input value={reviewer} onChange={(e) => setReviewer(e.target.value)} placeholder="your name" maxLength={64} /></label>
        <label>API token <input type="password" value={token} onChange={(e) => setToken(e.target.value)} placeholder="if the server needs one" /></label>
      </header>
      {view === "rate" ? (reviewer.trim() ? <RateView reviewer={reviewer.trim()} token={token} /> : <p role="status">Enter your reviewer name to start.</p>) : <TrendsView />}
    </main>
  );
}
