// The one entry point of `node --test`: the suites share one Docker engine and clean it between
// tests, so they must run one after the other, in one process (Node 18's runner, which Debian
// 12 ships, has no --test-concurrency).
import "./tag.js";
import "./errors.js";
import "./client.js";
import "./contracts.js";
