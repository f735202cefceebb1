// Runs ONNX models in headless Chromium through onnxruntime-web, on its wasm or WebNN backend.
//
// One browser per process, one page per backend; each job loads a model (its session is cached
// per model and free dimension overrides) and runs one set of feeds. Tensors travel as raw files:
// <prefix>.json lists {name, dtype, shape, offset, nbytes}, <prefix>.bin holds the bytes
// (little-endian, C order), for the feeds and for the outputs alike.
//
//   node harness.mjs --model m.onnx --feeds in --out out --backend webnn --strict --free-dim batch_size=1
//       one run: reads in.json/in.bin, writes out.json/out.bin; exit 1 (error on stderr) when it fails
//   node harness.mjs --serve
//       one JSON job per stdin line, one JSON answer per stdout line:
//       {"op": "run", "model": path, "feeds": prefix, "out": prefix, "backend": "wasm"|"webnn",
//        "strict": bool, "freeDims": {name: size}}  -> {"ok": true} or {"ok": false, "error": "..."}
//       {"op": "release", "model": path}             -> {"ok": true} (drops its cached sessions)
//       a run job with "repeat": N runs the feeds N times, writes no outputs -> {"ok": true, "ms": total}
//       {"op": "versions"}                           -> {"ok": true, "chromium": ..., "ort": ...}
//
// WebNN strict mode sets session.disable_cpu_ep_fallback=1: a node the WebNN execution provider
// does not take fails the session instead of running on the CPU; the error then lists the EP's
// own reasons, read from ORT's verbose log.

import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ORT_DIST = path.join(HERE, "node_modules", "onnxruntime-web", "dist");
const ORT_VERSION = JSON.parse(fs.readFileSync(path.join(ORT_DIST, "..", "package.json"), "utf8")).version;

// The machine may have no network: Chromium must not try to reach anything. No sandbox: CI runs
// as root, where Chromium refuses to start with one.
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--enable-features=WebMachineLearningNeuralNetwork",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--no-default-browser-check",
  "--disable-background-timer-throttling",
  "--disable-renderer-backgrounding",
  "--disable-backgrounding-occluded-windows",
];

// One page per backend: the wasm backend runs 10x faster from the plain wasm build than
// from the bundle that carries WebNN (its JSEP build: 30-50 ms against 600 ms a run here).
const BUNDLES = { wasm: "ort.wasm.min.js", webnn: "ort.min.js" };
const page = (backend) => `<!doctype html><meta charset="utf-8"><script src="/ort/${BUNDLES[backend]}"></script>
<script src="/page.js"></script>`;

// What runs in the page: fetch model and feeds, run, POST the outputs back.
const PAGE_SCRIPT = `
ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = 1;
ort.env.logLevel = "warning";
const sessions = new Map();
const ARRAYS = {float32: Float32Array, float64: Float64Array, int64: BigInt64Array, int32: Int32Array,
  int16: Int16Array, int8: Int8Array, uint64: BigUint64Array, uint32: Uint32Array, uint16: Uint16Array,
  uint8: Uint8Array, bool: Uint8Array, float16: Uint16Array};

async function session(job) {
  const key = [job.model, job.backend, job.strict, job.verbose, JSON.stringify(job.freeDims)].join(" ");
  if (!sessions.has(key)) {
    const model = new Uint8Array(await (await fetch("/file?path=" + encodeURIComponent(job.model))).arrayBuffer());
    const options = {
      executionProviders: [job.backend === "webnn" ? {name: "webnn", deviceType: "cpu"} : "wasm"],
      freeDimensionOverrides: job.freeDims,
      logSeverityLevel: job.verbose ? 0 : 3,
      logVerbosityLevel: 0,
    };
    if (job.strict) options.extra = {session: {disable_cpu_ep_fallback: "1"}};
    sessions.set(key, {model: job.model, session: await ort.InferenceSession.create(model, options)});
  }
  return sessions.get(key).session;
}

async function readTensors(prefix) {
  const [meta, bytes] = await Promise.all([
    fetch("/file?path=" + encodeURIComponent(prefix + ".json")).then(r => r.json()),
    fetch("/file?path=" + encodeURIComponent(prefix + ".bin")).then(r => r.arrayBuffer()),
  ]);
  const tensors = {};
  for (const t of meta.tensors) {
    const Array = ARRAYS[t.dtype];
    const data = new Array(bytes.slice(t.offset, t.offset + t.nbytes));
    tensors[t.name] = new ort.Tensor(t.dtype, data, t.shape);
  }
  return tensors;
}

async function writeTensors(prefix, tensors) {
  const entries = [], parts = [];
  let offset = 0;
  for (const [name, tensor] of Object.entries(tensors)) {
    const data = await tensor.getData();
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    entries.push({name, dtype: tensor.type, shape: tensor.dims, offset, nbytes: bytes.byteLength});
    parts.push(bytes);
    offset += bytes.byteLength;
  }
  await fetch("/write?path=" + encodeURIComponent(prefix + ".bin"), {method: "POST", body: new Blob(parts)});
  await fetch("/write?path=" + encodeURIComponent(prefix + ".json"),
              {method: "POST", body: JSON.stringify({tensors: entries})});
}

// A timing job (job.repeat runs) reads its feeds once and keeps them: only session.run is timed.
const timedFeeds = new Map();

window.runJob = async (job) => {
  try {
    const s = await session(job);
    if (job.repeat) {
      if (!timedFeeds.has(job.feeds)) timedFeeds.set(job.feeds, await readTensors(job.feeds));
      const feeds = timedFeeds.get(job.feeds);
      const start = performance.now();
      for (let i = 0; i < job.repeat; i++) await s.run(feeds);
      return {ok: true, ms: performance.now() - start};
    }
    const feeds = await readTensors(job.feeds);
    const outputs = await s.run(feeds);
    await writeTensors(job.out, outputs);
    return {ok: true};
  } catch (error) {
    return {ok: false, error: String(error && error.message || error)};
  }
};

window.release = async (model) => {
  for (const [key, value] of sessions) {
    if (value.model === model) { await value.session.release(); sessions.delete(key); }
  }
};
`;

const TYPES = { ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm" };

// Files the jobs name are served and written by path: the server listens on 127.0.0.1 only,
// for the lifetime of this process, and only paths that jobs named are allowed.
const allowed = new Set();

function serve(request, response) {
  const url = new URL(request.url, "http://127.0.0.1");
  const send = (status, body, type = "text/plain") => {
    response.writeHead(status, { "content-type": type });
    response.end(body);
  };
  if (url.pathname === "/" && url.searchParams.get("backend") in BUNDLES) {
    return send(200, page(url.searchParams.get("backend")), "text/html");
  }
  if (url.pathname === "/page.js") return send(200, PAGE_SCRIPT, "text/javascript");
  if (url.pathname.startsWith("/ort/")) {
    const file = path.join(ORT_DIST, path.basename(url.pathname));
    if (!fs.existsSync(file)) return send(404, "no such file");
    return send(200, fs.readFileSync(file), TYPES[path.extname(file)] || "application/octet-stream");
  }
  const file = url.searchParams.get("path");
  if (!file || !allowed.has(path.dirname(path.resolve(file)))) return send(403, "not a job's file");
  if (url.pathname === "/file") {
    if (!fs.existsSync(file)) return send(404, "no such file");
    return send(200, fs.readFileSync(file), "application/octet-stream");
  }
  if (url.pathname === "/write" && request.method === "POST") {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      fs.writeFileSync(file, Buffer.concat(chunks));
      send(200, "ok");
    });
    return;
  }
  send(404, "unknown request");
}

// From ORT's verbose log: which nodes the WebNN EP refused, and its reasons, on one line.
function refusals(lines) {
  const refused = [], reasons = new Map();  // a reason without its value names -> [first line, count]
  let total = "";
  for (const line of lines) {
    const node = /Operator type: \[(.+?)\] index: \[\d+\] name: \[(.*?)\] supported: \[0\]/.exec(line);
    const count = /number of nodes in the graph: (\d+)/.exec(line);
    if (node) refused.push(node.slice(1));
    else if (count) total = ` of ${count[1]}`;
    else if (/^\S+ \S+ \[V:onnxruntime:[^\]]*\] .*not supported/i.test(line)) {
      const reason = line.replace(/^\S+ \S+ \[V:onnxruntime:[^\]]*\] /, "").trim();
      const kind = reason.replace(/\[[^\]]*\]/g, "[]").replace(/: \S+$/, "");
      const seen = reasons.get(kind) || [reason, 0];
      reasons.set(kind, [seen[0], seen[1] + 1]);
    }
  }
  if (!refused.length) return "";
  const byType = {};
  for (const [type, name] of refused) (byType[type] ||= []).push(name);
  const nodes = Object.entries(byType).map(
    ([type, names]) => `${names.length} ${type} (${names[0]}${names.length > 1 ? ", ..." : ""})`);
  const why = [...reasons.values()].map(([reason, n]) => (n > 1 ? `${reason} (and ${n - 1} more)` : reason));
  return `WebNN EP left ${refused.length}${total} nodes to the CPU: ${nodes.join(", ")}` +
    (why.length ? `; its reasons: ${why.join("; ")}` : "");
}

// @sparticuz/chromium unpacks its binary into /tmp on first use; a second harness starting meanwhile (the other
// xdist worker) finds the file still open for writing and spawn fails with ETXTBSY: wait and try again.
async function launchChromium() {
  for (let attempt = 1; ; attempt++) {
    try {
      return await puppeteer.launch({
        executablePath: await chromium.executablePath(),
        headless: "shell",
        args: CHROMIUM_ARGS,
      });
    } catch (error) {
      if (!String(error).includes("ETXTBSY") || attempt >= 10) throw error;
      await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
    }
  }
}

class Harness {
  async start() {
    this.server = http.createServer(serve);
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.browser = await launchChromium();
    this.pages = {};
    this.log = [];
  }

  async page(backend) {
    if (!(backend in BUNDLES)) throw new Error(`backend is wasm or webnn, not ${backend}`);
    if (!this.pages[backend]) {
      const page = await this.browser.newPage();
      page.on("console", (message) => this.log.push(message.text()));
      await page.goto(`http://127.0.0.1:${this.server.address().port}/?backend=${backend}`);
      await page.waitForFunction(() => typeof window.runJob === "function");
      this.pages[backend] = page;
    }
    return this.pages[backend];
  }

  async run(job) {
    for (const file of [job.model, job.feeds, job.out]) allowed.add(path.dirname(path.resolve(file)));
    this.log = [];
    const page = await this.page(job.backend);
    // Verbose logs name what the WebNN EP refused; timed runs go without them (a session of their own).
    const verbose = Boolean(job.strict) && !job.repeat;
    const answer = await page.evaluate((job) => window.runJob(job), { ...job, verbose });
    if (process.env.GQA_BROWSER_DEBUG) process.stderr.write(this.log.join("\n") + "\n");  // ORT's log
    if (!answer.ok && job.strict) {
      const reasons = refusals(this.log);
      if (reasons) answer.error = `${reasons} (${answer.error})`;
    }
    if (!answer.ok) {
      // After a failed WebNN session, later sessions of the same page can fail to create their tensors
      // ("createTensor ... All dimensions should be positive"): the next job gets a fresh page.
      delete this.pages[job.backend];
      await page.close();
    }
    return answer;
  }

  async handle(job) {
    if (job.op === "versions") return { ok: true, chromium: await this.browser.version(), ort: ORT_VERSION };
    if (job.op === "release") {
      for (const page of Object.values(this.pages)) await page.evaluate((model) => window.release(model), job.model);
      return { ok: true };
    }
    if (job.op === "run") return this.run(job);
    return { ok: false, error: `unknown op ${job.op}` };
  }

  async close() {
    await this.browser?.close();
    this.server?.close();
  }
}

function parseArguments(argv) {
  const job = { op: "run", backend: "wasm", strict: false, freeDims: {} };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--serve") job.serve = true;
    else if (flag === "--strict") job.strict = true;
    else if (flag === "--model") job.model = argv[++i];
    else if (flag === "--feeds") job.feeds = argv[++i];
    else if (flag === "--out") job.out = argv[++i];
    else if (flag === "--backend") job.backend = argv[++i];
    else if (flag === "--free-dim") {
      const [name, size] = argv[++i].split("=");
      job.freeDims[name] = Number(size);
    } else throw new Error(`unknown argument ${flag}`);
  }
  if (!["wasm", "webnn"].includes(job.backend)) throw new Error(`--backend is wasm or webnn, not ${job.backend}`);
  if (!job.serve && !(job.model && job.feeds && job.out)) throw new Error("give --model, --feeds and --out, or --serve");
  return job;
}

async function main() {
  const job = parseArguments(process.argv.slice(2));
  const harness = new Harness();
  await harness.start();
  try {
    if (!job.serve) {
      const answer = await harness.run(job);
      if (!answer.ok) {
        process.stderr.write(`error: ${answer.error}\n`);
        process.exitCode = 1;
      }
      return;
    }
    process.stdout.write(JSON.stringify({ ok: true, ready: true }) + "\n");
    for await (const line of readline.createInterface({ input: process.stdin })) {
      if (!line.trim()) continue;
      let answer;
      try {
        answer = await harness.handle(JSON.parse(line));
      } catch (error) {
        answer = { ok: false, error: String(error && error.message || error) };
      }
      process.stdout.write(JSON.stringify(answer) + "\n");
    }
  } finally {
    await harness.close();
  }
}

main().catch((error) => {
  process.stderr.write(`error: ${error && error.message || error}\n`);
  process.exit(1);
});
