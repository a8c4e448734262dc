#!/usr/bin/env node
// Prints "N passed, N failed" from vitest's JSON report; exits 1 if it is missing or ran nothing.
'use strict';
const fs = require('node:fs');

const file = process.argv[2] || 'test-results.json';
if (!fs.existsSync(file)) {
  console.log('0 passed, 1 failed');
  console.error(`no test report at ${file}`);
  process.exit(1);
}
const report = JSON.parse(fs.readFileSync(file, 'utf8'));
const passed = report.numPassedTests;
const failed = report.numFailedTests + (report.numFailedTestSuites || 0);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
