// memplug from TypeScript, with nothing but fetch (Node 18+, Deno, Bun, browsers).
//
//   memplug keys create --user alice        # prints the key once
//   memplug serve                           # http://127.0.0.1:8080, API docs at /docs
//   MEMPLUG_URL=http://127.0.0.1:8080 MEMPLUG_API_KEY=mpk_... npx tsx memplug.ts
//
// Types for every endpoint can also be generated from the server's /openapi.json.

interface Item {
  id: number;
  scope: string;
  text: string;
  metadata: Record<string, unknown>;
  created_at: string;
  occurred_at: string | null;
}

interface Hit {
  item: Item;
  tier: string;
  score: number;
  relevance: number | null;
}

interface Recall {
  hits: Hit[];
  pinned: Hit[];
  text: string; // the memory block for a prompt
}

class MemplugError extends Error {
  constructor(public kind: string, message: string, public status: number) {
    super(`${kind}: ${message}`);
  }
}

class Memplug {
  constructor(private url: string, private key: string) {}

  private async call<T>(path: string, body?: unknown): Promise<T> {
    const response = await fetch(this.url + path, {
      method: body === undefined ? "GET" : "POST",
      headers: { Authorization: `Bearer ${this.key}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) throw new MemplugError(data.error, data.message, response.status);
    return data as T;
  }

  async write(scope: string, text: string, metadata?: Record<string, unknown>): Promise<Item> {
    return (await this.call<{ item: Item }>("/v1/write", { scope, text, metadata })).item;
  }

  async read(scope: string, query: string, k = 5): Promise<Recall> {
    return this.call<Recall>("/v1/read", { scope, query, budget: { k } });
  }

  async forget(scope: string, itemIds: number[]): Promise<number> {
    return (await this.call<{ forgotten: number }>("/v1/forget", { scope, item_ids: itemIds })).forgotten;
  }
}

async function main(): Promise<void> {
  const mem = new Memplug(process.env.MEMPLUG_URL ?? "http://127.0.0.1:8080", process.env.MEMPLUG_API_KEY ?? "");
  const user = process.env.MEMPLUG_USER ?? "alice";
  const kept = await mem.write(user, "Alice is allergic to shellfish.", { source: "typescript" });
  const recall = await mem.read(user, "what can't alice eat?");
  console.log(recall.text);
  console.log(`forgot ${await mem.forget(user, [kept.id])}`);
  try {
    await mem.write("someone-else", "not my user");
  } catch (e) {
    console.log((e as MemplugError).status, (e as Error).message); // 403 AccessDenied: ... covers user(s) alice ...
  }
}

main();
