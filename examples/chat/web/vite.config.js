import { defineConfig } from "vite"

// The backend serves dist/ (index.html at /, the bundle under /assets/): nothing is fetched
// from a CDN at run time.
export default defineConfig({
  build: { outDir: "dist", emptyOutDir: true, target: "es2022" },
})
