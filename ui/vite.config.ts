import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// The build goes into the Python package, which serves it at /ui (loyaltylens.feedback / the app of module 7).
export default defineConfig({
  plugins: [react()],
  base: "/ui/",
  build: { outDir: "../loyaltylens/static/ui", emptyOutDir: true },
  // `npm run dev` proxies the API to a local `loyaltylens serve`
  server: { proxy: { "/feedback": "http://127.0.0.1:8000" } },
});
