// docs/CORRECTIONS.md with the official TypeScript client: supersede (fork a
// successor at the last good offset, close the old stream naming it) and retention, then the
// State Protocol's compaction read by a late StreamDB. That doc shows the recipe blocks of
// this file as they are here (tests/test_revisions.py checks both). Prints the outcome as JSON.
// Run from examples/chat/web with the stream root URL, e.g. http://127.0.0.1:4437/v1/stream.
import { DurableStream } from "@durable-streams/client"
import { createStateSchema } from "@durable-streams/state"
import { createStreamDB } from "@durable-streams/state/db"

const base = process.argv[2]
const run = Math.random().toString(36).slice(2, 8) // fresh stream names on every run
const out = { run }

// -- recipe: supersede
// The official client has no call for Relay's extension headers; a handle's headers go with
// each of its requests, so a fork is a create with fork headers and the close names the
// successor.
async function supersede(oldUrl, successorUrl, goodOffset, contentType) {
  const successor = await DurableStream.create({
    url: successorUrl,
    contentType,
    headers: { "Stream-Forked-From": oldUrl, "Stream-Fork-Offset": goodOffset },
  })
  const old = new DurableStream({ url: oldUrl, headers: { "Stream-Successor": successorUrl } })
  await old.close()
  return successor
}
// -- end

// -- recipe: retain
async function retain(url, fromOffset) {
  const res = await fetch(url, { method: "PUT", headers: { "Stream-Retain-From": fromOffset } })
  if (res.status !== 200) throw new Error(`retain: ${res.status} ${await res.text()}`)
  return res.headers.get("Stream-Retained-From")
}
// -- end

const text = "text/plain"
const reply = await DurableStream.create({ url: `${base}/ts-answer-1-${run}`, contentType: text })
await reply.append("The capital is ")
const { offset: good } = await reply.head()
await reply.append("Lyon.")
const successor = await supersede(reply.url, `${base}/ts-answer-2-${run}`, good, text)
await successor.append("Paris.")
const read = async (handle) => (await handle.stream({ live: false })).text()
const oldAnswer = await fetch(`${reply.url}?offset=-1`)
out.supersede = {
  old: await oldAnswer.text(),
  link: oldAnswer.headers.get("Link"),
  successor: await read(successor),
}

// Compaction of a State Protocol stream: the current rows as a snapshot in one POST, then
// retain from where the snapshot starts. A late StreamDB reader downloads only the snapshot.
const json = "application/json"
const stateUrl = `${base}/ts-chat-state-${run}`
const state = await DurableStream.create({ url: stateUrl, contentType: json })
// One POST of a JSON array is one atomic append of its messages (the client's append would
// wrap a string in an array of its own).
async function post(url, messages) {
  const res = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": json },
    body: JSON.stringify(messages),
  })
  if (res.status >= 300) throw new Error(`POST ${res.status}: ${await res.text()}`)
}
const change = (id, title, operation) => ({
  type: "chat",
  key: id,
  value: { id, title },
  headers: { operation },
})
const history = []
for (let n = 0; n < 30; n++) {
  history.push(change(String(n % 3), `title ${n}`, n < 3 ? "insert" : "update"))
}
await post(stateUrl, history)
const { offset: snapshotAt } = await state.head()
await post(stateUrl, [
  { headers: { control: "snapshot-start" } },
  ...[27, 28, 29].map((n) => change(String(n % 3), `title ${n}`, "insert")),
  { headers: { control: "snapshot-end" } },
])
out.retainedFrom = await retain(stateUrl, snapshotAt)

let downloaded = 0
const counting = async (input, init) => {
  const res = await fetch(input, init)
  const body = await res.arrayBuffer()
  downloaded += body.byteLength
  return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers })
}
const passThrough = () => ({
  "~standard": { version: 1, vendor: "relay-check", validate: (value) => ({ value }) },
})
const db = createStreamDB({
  streamOptions: { url: stateUrl, contentType: json, fetch: counting },
  state: createStateSchema({ chats: { schema: passThrough(), type: "chat", primaryKey: "id" } }),
})
await db.preload()
out.late = [...db.collections.chats.toArray]
  .map(({ id, title }) => ({ id, title }))
  .sort((a, b) => a.id.localeCompare(b.id))
out.lateDownloaded = downloaded
out.historyBytes = JSON.stringify(history).length
db.close()
console.log(JSON.stringify(out))
