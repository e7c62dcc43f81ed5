// The revision convention for State Protocol streams (docs/CORRECTIONS.md): a
// correction is update and delete change messages under one txid, appended in one POST. A live
// StreamDB reader (parked before the correction) and a late one must end with the same rows.
// Prints {before, live, late} as JSON; run from examples/chat/web with the stream URL.
import { createStateSchema } from "@durable-streams/state"
import { createStreamDB } from "@durable-streams/state/db"

const url = process.argv[2]
const passThrough = () => ({
  "~standard": { version: 1, vendor: "relay-check", validate: (value) => ({ value }) },
})
const schema = createStateSchema({
  messages: { schema: passThrough(), type: "message", primaryKey: "id" },
})
const json = { "Content-Type": "application/json" }

async function post(messages) {
  const res = await fetch(url, { method: "POST", headers: json, body: JSON.stringify(messages) })
  if (res.status >= 300) throw new Error(`POST ${res.status}: ${await res.text()}`)
}
const change = (id, text, operation, txid) => ({
  type: "message",
  key: id,
  value: { id, text },
  headers: { operation, ...(txid ? { txid } : {}) },
})
async function reader() {
  const db = createStreamDB({
    streamOptions: { url, contentType: "application/json" },
    state: schema,
    live: "long-poll",
  })
  await db.preload()
  return db
}
const rows = (db) =>
  [...db.collections.messages.toArray]
    .map(({ id, text }) => ({ id, text }))
    .sort((a, b) => a.id.localeCompare(b.id))

const created = await fetch(url, { method: "PUT", headers: json })
if (created.status !== 201) throw new Error(`PUT ${created.status}`)
await post([
  change("1", "The capital of France is Lyon.", "insert"),
  change("2", "It has two million people.", "insert"),
  change("3", "Ask me more.", "insert"),
])
const live = await reader()
const before = rows(live)
await post([
  change("1", "The capital of France is Paris.", "update", "fix-1"),
  { type: "message", key: "2", headers: { operation: "delete", txid: "fix-1" } },
])
await live.utils.awaitTxId("fix-1", 10000)
const late = await reader()
console.log(JSON.stringify({ before, live: rows(live), late: rows(late) }))
live.close()
late.close()
