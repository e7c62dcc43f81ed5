// The official TypeScript client against a server: node ts-client-check.mjs BASE_URL [TOKEN]
// An IdempotentProducer writes a reply token by token and closes with a final message, while
// a live subscriber started first reads along; both the live reader and a later catch-up read
// must see every token exactly once, in order, and the close. Exits non-zero on any mismatch.
// With TOKEN (a relay with access control on), every request carries it through the client's
// `headers` option (a function, called per request), and a wrong token must be refused (401).
import { DurableStream, IdempotentProducer, stream } from "@durable-streams/client"

const base = process.argv[2]
const token = process.argv[3]
const headers = token ? { Authorization: () => `Bearer ${token}` } : undefined
const url = `${base}/v1/stream/ts-client-${Date.now()}-${Math.random().toString(16).slice(2)}`
const TOKENS = 300
const expected = [...Array(TOKENS).keys()].map((i) => ({ token: i })).concat([{ done: true }])

function check(label, items) {
  const got = JSON.stringify(items)
  if (got !== JSON.stringify(expected)) {
    console.error(`${label}: expected ${expected.length} items, got ${items.length}`)
    console.error(got.slice(0, 400))
    process.exit(1)
  }
}

if (token) {
  for (const attempt of [
    () => DurableStream.create({ url, contentType: "application/json", headers: { Authorization: "Bearer wrong-token" } }),
    () => DurableStream.create({ url, contentType: "application/json" }),
  ]) {
    const status = await attempt().then(
      () => "accepted",
      (err) => err.status,
    )
    if (status !== 401) {
      console.error(`a wrong or missing token: expected 401, got ${status}`)
      process.exit(1)
    }
  }
}

const handle = await DurableStream.create({ url, contentType: "application/json", headers })

const live = await stream({ url, offset: "-1", live: true, json: true, headers })
const liveItems = []
const liveDone = new Promise((resolve, reject) => {
  live.subscribeJson(async (batch) => {
    liveItems.push(...batch.items)
    if (batch.streamClosed) resolve()
  })
  live.closed.catch(reject) // resolve only from the batch that reports the close
})

const errors = []
const producer = new IdempotentProducer(handle, "ts-check", {
  lingerMs: 1,
  onError: (err) => errors.push(err),
})
for (let i = 0; i < TOKENS; i++) producer.append(JSON.stringify({ token: i }))
await producer.flush()
await producer.close(JSON.stringify({ done: true }))
if (errors.length) {
  console.error("producer errors:", errors)
  process.exit(1)
}

await Promise.race([
  liveDone,
  new Promise((_, reject) => setTimeout(() => reject(new Error("live reader timed out")), 20000)),
])
check("live subscriber", liveItems)

const caughtUp = await stream({ url, offset: "-1", live: false, json: true, headers })
check("catch-up read", await caughtUp.json())
console.log(`ok: ${expected.length} items live and in catch-up${token ? ", with a token" : ""}`)
process.exit(0)
