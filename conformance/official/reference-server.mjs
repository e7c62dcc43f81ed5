// Starts the upstream Node reference server (in memory) on PORT, for cross-checking our suite.
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.env.PORT || 4438)
const server = new DurableStreamTestServer({ port, host: "127.0.0.1", longPollTimeout: 1000 })
await server.start()
console.log(`reference server on http://127.0.0.1:${port}`)
