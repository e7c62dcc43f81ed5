// The chat page. The conversation (chat title, messages, which stream holds each reply) comes
// from the chat's State Protocol stream through @durable-streams/state (a TanStack DB live
// query); each assistant reply is read from its own Relay stream with @durable-streams/client,
// its text and offset saved in localStorage after every batch so a reload resumes where it was.
// Every read goes to the relay directly, with a short-lived read-only token from the backend.
import { FetchError, stream } from "@durable-streams/client"
import type { BackoffOptions } from "@durable-streams/client"
import { createStateSchema } from "@durable-streams/state"
import { createStreamDB } from "@durable-streams/state/db"
import { createLiveQueryCollection } from "@tanstack/db"

type ChatRow = { id: string; title: string; created_at: number }
type MessageRow = {
  id: string
  chat_id: string
  position: number
  role: "user" | "assistant"
  text: string
  status: "streaming" | "done" | "error"
  stream: string | null
  created_at: number
}
type ReplyEvent = { type: "token"; delta: string }
type Saved = { offset: string; text: string; closed: boolean }
type Session = { relay_url: string; state_url: string; token: string; expires_at: number }

// Replies are read with long-poll by default, or SSE with ?live=sse. The conversation (a few
// changes per message) is always read with long-poll, whose failed requests the client retries
// with backoffOptions; in a browser an SSE connection cut by a relay restart is not resumed by
// the client, and follow() below resumes it itself.
const REPLY_LIVE = new URLSearchParams(location.search).get("live") === "sse" ? "sse" : "long-poll"
// Retry every failed read within half a second, forever (offline, relay restarting).
const backoffOptions: BackoffOptions = {
  initialDelay: 100,
  maxDelay: 500,
  multiplier: 1.5,
  maxRetries: Infinity,
}
const REFRESH_BEFORE_MS = 60_000

// The rows come from our own backend; a pass-through Standard Schema accepts them as they are.
function rows<T>() {
  return {
    "~standard": {
      version: 1 as const,
      vendor: "relay-chat",
      validate: (value: unknown) => ({ value: value as T }),
    },
  }
}
const schema = createStateSchema({
  chats: { schema: rows<ChatRow>(), type: "chat", primaryKey: "id" },
  messages: { schema: rows<MessageRow>(), type: "message", primaryKey: "id" },
})

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T
const list = $<HTMLOListElement>("messages")
const statusLine = $<HTMLParagraphElement>("status")

async function chatId(): Promise<string> {
  const existing = location.hash.slice(1)
  if (existing) return existing
  const res = await fetch("/api/chats", { method: "POST" })
  const { id } = (await res.json()) as { id: string }
  history.replaceState(null, "", `${location.pathname}${location.search}#${id}`)
  return id
}

const id = await chatId()
let session: Session | null = null

async function currentSession(): Promise<Session> {
  if (session === null || session.expires_at * 1000 - Date.now() < REFRESH_BEFORE_MS) {
    try {
      const res = await fetch(`/api/chats/${id}/session`)
      if (!res.ok) throw new Error(`session: ${res.status}`)
      session = (await res.json()) as Session
    } catch (err) {
      if (session === null) throw err // offline with a token in hand: keep using it
    }
  }
  return session
}
const headers = { Authorization: async () => `Bearer ${(await currentSession()).token}` }
// A 401 means the token expired or was revoked: fetch a fresh one and retry.
const onError = (error: Error) => {
  if (error instanceof FetchError && error.status === 401) session = null
  return {}
}

function show(el: HTMLElement, saved: Saved) {
  el.textContent = saved.text
  el.dataset.done = String(saved.closed)
}

async function follow(message: MessageRow, el: HTMLElement): Promise<void> {
  const key = `relay-chat:${message.stream}`
  const saved: Saved = JSON.parse(localStorage.getItem(key) ?? "null") ?? {
    offset: "-1",
    text: "",
    closed: false,
  }
  show(el, saved)
  let reads = 0
  while (!saved.closed) {
    // A batch that arrives for a read this loop has given up on is the next read's to fetch.
    const read = ++reads
    try {
      const { relay_url } = await currentSession()
      const res = await stream<ReplyEvent>({
        url: `${relay_url}/v1/stream/${message.stream}`,
        offset: saved.offset,
        live: REPLY_LIVE,
        json: true,
        headers,
        backoffOptions,
        onError,
      })
      let sawClose = () => {}
      const closeSeen = new Promise<void>((resolve) => (sawClose = resolve))
      res.subscribeJson(async (batch) => {
        if (read !== reads) return
        for (const item of batch.items) if (item.type === "token") saved.text += item.delta
        saved.offset = batch.offset
        saved.closed = batch.streamClosed
        // Text and offset in one entry: a reload restores exactly the text up to that offset.
        localStorage.setItem(key, JSON.stringify(saved))
        show(el, saved)
        if (batch.streamClosed) sawClose()
      })
      await res.closed
      // On a stream already closed at the first read, the client (0.2.6) settles `closed`
      // before its subscriber has the batch: wait for it (or read again from saved.offset).
      await Promise.race([closeSeen, new Promise((resolve) => setTimeout(resolve, 1000))])
    } catch {
      // In a browser, an SSE response cut off mid-stream (the relay restarted) ends the
      // client's session with an error instead of a reconnect: start again at the saved offset.
      await new Promise((resolve) => setTimeout(resolve, backoffOptions.initialDelay))
    }
  }
}

function render(messages: MessageRow[]) {
  for (const m of messages) {
    let li = list.querySelector<HTMLLIElement>(`li[data-message="${m.id}"]`)
    if (li === null) {
      li = document.createElement("li")
      li.dataset.message = m.id
      li.className = m.role
      const body = document.createElement("span")
      body.dataset.testid = `${m.role === "user" ? "user" : "reply"}-${m.id}`
      li.append(body)
      list.append(li)
      if (m.role === "user") body.textContent = m.text
      else if (m.stream) void follow(m, body)
    }
    li.dataset.status = m.status
  }
}

const { state_url } = await currentSession()
const db = createStreamDB({
  streamOptions: { url: state_url, contentType: "application/json", headers, backoffOptions },
  state: schema,
  live: "long-poll",
})
await db.preload()

const conversation = createLiveQueryCollection((q) =>
  q.from({ m: db.collections.messages }).orderBy(({ m }) => m.position, "asc"),
)
conversation.subscribeChanges(() => render(conversation.toArray as MessageRow[]), {
  includeInitialState: true,
})
const chats = createLiveQueryCollection((q) => q.from({ c: db.collections.chats }))
chats.subscribeChanges(
  () => {
    const title = (chats.toArray as ChatRow[])[0]?.title
    if (title) $("title").textContent = title
  },
  { includeInitialState: true },
)

$<HTMLFormElement>("composer").addEventListener("submit", async (event) => {
  event.preventDefault()
  const input = $<HTMLInputElement>("text")
  const text = input.value.trim()
  if (!text) return
  input.value = ""
  let res: Response
  try {
    res = await fetch(`/api/chats/${id}/messages`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text }),
    })
  } catch {
    // The backend went away: it may have stored the message first, which then shows up.
    statusLine.textContent = "send failed: no answer from the backend"
    return
  }
  if (!res.ok) {
    statusLine.textContent = `send failed: ${res.status}`
    return
  }
  // On Postgres the relay appends the send's transaction to the state stream (a table
  // stream): the message is stored, and on its way here until that transaction arrives.
  const { txid } = (await res.json()) as { txid: string | null }
  if (txid === null) return
  statusLine.textContent = "sending…"
  try {
    await db.utils.awaitTxId(txid, 60_000)
    statusLine.textContent = ""
  } catch {
    statusLine.textContent = "stored; the relay has not shown it yet"
  }
})
// What the page holds, for tests (tests/test_chat_browser.py compares it with the database).
Object.assign(window, {
  chatRows: () => ({ chats: db.collections.chats.toArray, messages: db.collections.messages.toArray }),
})
document.body.dataset.ready = "true"
