// Drives the chat page in headless Chromium for tests/test_chat_browser.py's crash test (the
// example on Postgres, its state streams written by the relay from the chat tables): sends one
// message while the test kills -9 the backend after its database write (before the model's
// first token) and restarts it, then has the test kill -9 and restart the relay mid-reply, and
// ends with what the page holds once the reply is done.
// Talks to the test over stdio: prints {"event": "sending"} before it sends, waits for a line
// "backend restarted"; prints {"event": "kill-relay"} mid-reply, waits for "restarted"; ends
// with {"event": "result", ...}.
//   node e2e/crashes.mjs BACKEND_URL PROMPT
import { createInterface } from "node:readline"
import { chromium } from "playwright-core"

const [backend, prompt] = process.argv.slice(2)
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]()
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n")
const expect = async (word) => {
  const answer = (await lines.next()).value ?? ""
  if (answer !== word) throw new Error(`expected ${word}, got ${answer}`)
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
})
const errors = []
try {
  const page = await browser.newPage()
  page.on("pageerror", (err) => errors.push(String(err)))
  page.on("console", (msg) => {
    if (!msg.text().startsWith("Failed to load resource")) {
      process.stderr.write(`[page ${msg.type()}] ${msg.text()}\n`)
    }
  })
  await page.goto(`${backend}/`)
  await page.waitForSelector("body[data-ready=true]", { timeout: 20_000 })
  const chat = new URL(page.url()).hash.slice(1)

  // 1. The backend is killed once the send is in the database, before the first token.
  say({ event: "sending", chat })
  await page.fill("[data-testid=input]", prompt)
  await page.click("[data-testid=send]")
  const el = await page.waitForSelector("[data-testid^=reply-]", { timeout: 30_000 })
  const replyId = (await el.getAttribute("data-testid")).replace(/^reply-/, "")
  const sel = `[data-testid=reply-${replyId}]`
  await expect("backend restarted")
  const longer = (n) => page.waitForFunction(
    ([s, n]) => (document.querySelector(s)?.textContent.length ?? -1) > n,
    [sel, n], { polling: 10, timeout: 60_000 })

  // 2. The relay is killed mid-reply (the restarted backend is writing it) and restarted.
  await longer(100)
  say({ event: "kill-relay", stream: `chat/${chat}/reply/${replyId}` })
  await expect("restarted")

  // 3. The test kills the relay again as the reply's last transaction commits; the page
  //    ends with the reply closed and its row done.
  await page.waitForSelector(`${sel}[data-done=true]`, { timeout: 60_000 })
  await page.waitForSelector(`li[data-message="${replyId}"][data-status=done]`, { timeout: 60_000 })
  const text = await page.evaluate((s) => document.querySelector(s)?.textContent ?? "", sel)
  const listed = await page.$$eval("li[data-message]", (els) => els.map((e) => e.dataset.message))
  const rows = await page.evaluate(() => window.chatRows())
  const status = await page.evaluate(() => document.getElementById("status")?.textContent ?? "")
  say({ event: "result", chat, reply: replyId, text, listed, rows, status, errors })
} finally {
  await browser.close()
}
process.exit(0)
