// The official suite, pointed at CONFORMANCE_TEST_URL. Importing it from a test file of our
// own sidesteps vitest's refusal to collect test files that sit inside node_modules.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) throw new Error("set CONFORMANCE_TEST_URL to the server's base URL")

runConformanceTests({ baseUrl, subscriptions: true })
