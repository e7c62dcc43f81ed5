// Drives the chat page in headless Chromium (Debian's /usr/bin/chromium through playwright-core)
// for tests/test_chat_browser.py: sends one message and, while the reply streams, reloads the
// page, takes the browser offline for a second, and has the test kill -9 and restart the relay.
// Talks to the test over stdio: prints {"event": "kill", "stream": ...} and waits for a line
// "restarted" (the relay answers again); ends
// with {"event": "result", ...}: the rendered reply and the time from each disruption to the
// next token on screen.
//   node e2e/drive.mjs BACKEND_URL PROMPT [long-poll|sse]
import { createInterface } from "node:readline"
import { chromium } from "playwright-core"

const [backend, prompt, live = "long-poll"] = process.argv.slice(2)
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]()
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n")
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
})
const errors = []
try {
  const context = await browser.newContext()
  const page = await context.newPage()
  page.on("pageerror", (err) => errors.push(String(err)))
  page.on("console", (msg) => {
    // Failed loads while offline or while the relay is down are expected; the rest may matter.
    if (!msg.text().startsWith("Failed to load resource")) {
      process.stderr.write(`[page ${msg.type()}] ${msg.text()}\n`)
    }
  })
  page.on("response", (r) => {
    if (r.status() >= 400) process.stderr.write(`[page http] ${r.status()} ${r.url()}\n`)
  })
  const replyReads = []
  page.on("request", (req) => {
    if (req.url().includes("/reply/")) replyReads.push(req.url())
  })
  const ready = async () => page.waitForSelector("body[data-ready=true]", { timeout: 20_000 })

  await page.goto(`${backend}/${live === "sse" ? "?live=sse" : ""}`)
  await ready()
  await page.fill("[data-testid=input]", prompt)
  await page.click("[data-testid=send]")
  const el = await page.waitForSelector("[data-testid^=reply-]", { timeout: 20_000 })
  const replyId = (await el.getAttribute("data-testid")).replace(/^reply-/, "")
  const sel = `[data-testid=reply-${replyId}]`
  const length = () => page.evaluate((s) => document.querySelector(s)?.textContent.length ?? -1, sel)
  const text = () => page.evaluate((s) => document.querySelector(s)?.textContent ?? "", sel)
  // Milliseconds from `since` until the reply is longer than `than` characters on screen.
  const grows = async (than, since) => {
    await page.waitForFunction(
      ([s, n]) => (document.querySelector(s)?.textContent.length ?? -1) > n,
      [sel, than],
      { polling: 5, timeout: 30_000 },
    )
    return Date.now() - since
  }
  const timings = {}
  await grows(0, Date.now())
  await sleep(1500)

  // 1. Reload mid-reply: the saved text is back at once, then the read resumes at the saved
  //    offset (the first reply read after the reload must not start from -1).
  const before = await text()
  replyReads.length = 0
  let t0 = Date.now()
  await page.reload()
  await ready()
  await page.waitForFunction(([s, n]) => (document.querySelector(s)?.textContent.length ?? -1) >= n,
    [sel, before.length], { polling: 5, timeout: 20_000 })
  timings.reload_to_restored_ms = Date.now() - t0
  const restored = await text()
  timings.reload_to_next_token_ms = await grows(restored.length, t0)
  const resumedAt = new URL(replyReads[0]).searchParams.get("offset")
  await sleep(1000)

  // 2. Offline for one second.
  await context.setOffline(true)
  await sleep(1000)
  const offline = await length()
  await context.setOffline(false)
  t0 = Date.now()
  timings.online_to_next_token_ms = await grows(offline, t0)
  await sleep(1000)

  // 3. The relay is killed with SIGKILL and restarted on the same data by the test.
  const killedAt = Date.now()
  const chat = new URL(page.url()).hash.slice(1)
  say({ event: "kill", stream: `chat/${chat}/reply/${replyId}` })
  const answer = (await lines.next()).value ?? ""
  const restartedAt = Date.now()
  timings.kill_to_relay_answering_ms = restartedAt - killedAt
  timings.relay_answering_to_next_token_ms = await grows(await length(), restartedAt)
  timings.kill_to_next_token_ms = timings.relay_answering_to_next_token_ms + (restartedAt - killedAt)
  if (!answer.startsWith("restarted")) throw new Error(`unexpected answer ${answer}`)

  await page.waitForSelector(`${sel}[data-done=true]`, { timeout: 60_000 })
  // The reply's row says done too (its last change may come after the stream's close).
  await page.waitForSelector(`li[data-message="${replyId}"][data-status=done]`, { timeout: 60_000 })
  const replies = await page.$$eval("[data-testid^=reply-]", (els) => els.length)
  say({ event: "result", chat, text: await text(), before, restored, resumedAt, replies, timings, errors })
} finally {
  await browser.close()
}
process.exit(0)
