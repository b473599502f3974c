// The feedback API (loyaltylens.feedback.router), typed. Every call throws an Error whose message says what failed.

export type Copy = { headline: string; body: string; cta: string; tone: string };
export type Pair = {
  pair_id: string;
  customer: Record<string, string | number>;
  offer: Record<string, string | number>;
  a: Copy;
  b: Copy;
};
export type Choice = "A" | "B" | "tie";
export type Feedback = {
  pair_id: string;
  reviewer: string;
  choice: Choice;
  rating_a: number;
  rating_b: number;
  comment: string | null;
  idempotency_key: string;
};
export type Stored = Feedback & { id: number; created_at: string; customer_id: string; offer_id: string };
export type Group = { key: string; n: number; mean_rating: number | null };
export type HeadToHead = { version: string; opponent: string; wins: number; losses: number; ties: number; win_rate: number | null };
export type Stats = {
  days: number;
  since: string;
  until: string;
  n: number;
  n_simulated: number;
  mean_rating: number | null;
  by_prompt_version: Group[];
  by_backend: Group[];
  by_category: Group[];
  head_to_head: HeadToHead[];
  daily: { day: string; n: number; mean_rating: number | null }[];
};

function headers(token: string): Record<string, string> {
  const h: Record<string, string> = { "Content-Type": "application/json" };
  if (token) h["Authorization"] = `Bearer ${token}`;
  return h;
}

async function readError(r: Response): Promise<Error> {
  let detail = `${r.status} ${r.statusText}`;
  try {
    const body = await r.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail))
      detail = body.detail.map((d: { loc?: string[]; msg?: string }) => `${(d.loc ?? []).slice(1).join(".")}: ${d.msg}`).join("; ");
  } catch {
    /* not JSON: keep the status line */
  }
  return new Error(detail);
}

async function call<T>(path: string, init?: RequestInit): Promise<T> {
  let r: Response;
  try {
    r = await fetch(path, init);
  } catch {
    throw new Error("the feedback API is unreachable (is `loyaltylens serve` running?)");
  }
  if (!r.ok) throw await readError(r);
  return (await r.json()) as T;
}

export const nextPair = (reviewer: string) => call<Pair>(`/feedback/next?reviewer=${encodeURIComponent(reviewer)}`);
export const stats = (days: number) => call<Stats>(`/feedback/stats?days=${days}`);
export const submit = (fb: Feedback, token: string) =>
  call<Stored>("/feedback", { method: "POST", headers: headers(token), body: JSON.stringify(fb) });

export function newKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID(); // secure contexts (https, localhost)
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-a${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
}
