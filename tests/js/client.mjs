// The official Replicate JavaScript client (npm `replicate`) pointed at the gateway:
// only `baseUrl` and `auth` differ from code written for Replicate.
//
//   node tests/js/client.mjs SECTION...   (sections below; none: all of them)
//
// Environment: WHISPERX_BASE_URL (the gateway's /v1), WHISPERX_TOKEN, WHISPERX_OTHER_TOKEN
// (a second namespace), WHISPERX_AUDIO_FILE (a WAV file). Prints one JSON line of what it
// observed; tests/gateway/test_js_client.py asserts it field by field. The gateway's
// stand-in runner (tests/gateway/fake_runner.py) reacts to `initial_prompt`.

import { readFile } from "node:fs/promises";
import http from "node:http";
import { isDeepStrictEqual } from "node:util";
import Replicate, { validateWebhook } from "replicate";

const baseUrl = process.env.WHISPERX_BASE_URL;
const auth = process.env.WHISPERX_TOKEN;
const otherAuth = process.env.WHISPERX_OTHER_TOKEN;
const AUDIO = "data:audio/wav;base64,UklGRg==";
const SLOW = { audio_file: AUDIO, initial_prompt: "stand-in:slow" };
const HANG = { audio_file: AUDIO, initial_prompt: "stand-in:hang" };
const DEADLINE_MS = 60_000;

// Records what the client sends and gets, through the client's own `fetch` option.
const calls = [];
async function recordingFetch(url, init) {
  const response = await fetch(url, init);
  calls.push({
    method: init.method,
    path: new URL(url).pathname,
    prefer: init.headers?.Prefer ?? null,
    status: response.status,
    preference_applied: response.headers.get("preference-applied"),
  });
  return response;
}

const replicate = new Replicate({ auth, baseUrl, fetch: recordingFetch });

async function traced(fn) {
  calls.length = 0;
  const value = await fn();
  return [value, [...calls]];
}

// An ApiError's status and message, or a plain Error's message.
async function failure(fn) {
  try {
    await fn();
  } catch (err) {
    return { name: err.name, status: err.response?.status ?? null, message: err.message };
  }
  throw new Error("expected an error");
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// A client's webhook endpoint on loopback.
async function startReceiver() {
  const deliveries = [];
  let arrived = () => {};
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      deliveries.push({ headers: req.headers, body: Buffer.concat(chunks).toString() });
      res.writeHead(204).end();
      arrived();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const until = async (predicate, ms = 20_000) => {
    const deadline = Date.now() + ms;
    while (!predicate(deliveries)) {
      if (Date.now() > deadline) throw new Error(`webhooks: ${JSON.stringify(deliveries)}`);
      await new Promise((resolve) => {
        arrived = resolve;
        setTimeout(resolve, 200);
      });
    }
  };
  const url = `http://127.0.0.1:${server.address().port}/hook`;
  return { url, deliveries, until, close: () => server.close() };
}

const sections = {
  // models.get, models.versions.list/get, and run() by name and by version.
  async models_and_run() {
    const model = await replicate.models.get("acme", "whisperx");
    const versions = await replicate.models.versions.list("acme", "whisperx");
    const versionId = model.latest_version.id;
    const version = await replicate.models.versions.get("acme", "whisperx", versionId);
    const models = await replicate.models.list();
    const input = model.latest_version.openapi_schema.components.schemas.Input;

    // The default: `Prefer: wait`, and no polling when the answer is final.
    const [output, blockCalls] = await traced(() =>
      replicate.run("acme/whisperx", { input: { audio_file: AUDIO } }),
    );
    // A wait that runs out: the answer says `starting` and the client polls.
    const statuses = [];
    const [slow, shortCalls] = await traced(() =>
      replicate.run("acme/whisperx", { input: SLOW, wait: { mode: "block", timeout: 1 } }, (p) =>
        statuses.push(p.status),
      ),
    );
    const [polled, pollCalls] = await traced(() =>
      replicate.run("acme/whisperx", { input: SLOW, wait: { mode: "poll", interval: 100 } }),
    );
    const [byVersion, versionCalls] = await traced(() =>
      replicate.run(`acme/whisperx:${versionId}`, {
        input: { audio_file: AUDIO, language: "fr" },
      }),
    );
    return {
      model: { owner: model.owner, name: model.name, url: model.url },
      latest_version: versionId,
      input_properties: Object.keys(input.properties),
      models: models.results.map((m) => m.name),
      versions: versions.results.map((v) => v.id),
      version: version.id,
      run: { output, calls: blockCalls },
      short_wait: { output: slow, calls: shortCalls, statuses },
      poll: { output: polled, calls: pollCalls },
      by_version: { output: byVersion, calls: versionCalls },
    };
  },

  // predictions.create/get/list/cancel, replicate.wait, and signed webhooks.
  async predictions() {
    const receiver = await startReceiver();
    try {
      const { latest_version: v } = await replicate.models.get("acme", "whisperx");
      const hanging = await replicate.predictions.create({ model: "acme/whisperx", input: HANG });
      const created = await replicate.predictions.create({
        version: v.id,
        input: SLOW,
        webhook: receiver.url,
        webhook_events_filter: ["start", "completed"],
      });
      const waited = await replicate.wait(created, { interval: 100 });
      const fetched = await replicate.predictions.get(created.id);
      const page = await replicate.predictions.list();
      const canceled = await replicate.predictions.cancel(hanging.id);
      const afterCancel = await replicate.wait(canceled);
      const cancelEnded = await failure(() => replicate.predictions.cancel(created.id));
      // run() with an AbortSignal: it stops polling and cancels the prediction.
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 300);
      const [aborted, abortCalls] = await traced(() =>
        replicate.run("acme/whisperx", {
          input: HANG,
          signal: controller.signal,
          wait: { mode: "poll", interval: 100 },
        }),
      );

      await receiver.until((d) => d.some((x) => JSON.parse(x.body).status === "succeeded"));
      const secret = await replicate.webhooks.default.secret.get();
      const validations = [];
      for (const { headers, body } of receiver.deliveries) {
        // As a Node handler passes it, and as a Fetch API `Request` (Next.js, workers).
        const request = new Request(receiver.url, { method: "POST", headers, body });
        validations.push([
          await validateWebhook({ headers, body }, secret.key),
          await validateWebhook(request, secret.key),
        ]);
      }
      const last = receiver.deliveries.at(-1);
      const forged = last.body.replace('"succeeded"', '"failed"');
      const otherKey = `whsec_${Buffer.alloc(32, 7).toString("base64")}`;
      const now = Date.now() / 1000;
      return {
        hanging: { id: hanging.id, status: hanging.status },
        created: {
          id: created.id,
          status: created.status,
          version: created.version,
          urls: created.urls,
          input: created.input,
        },
        waited: { status: waited.status, output: waited.output, metrics: waited.metrics },
        fetched_equals_waited: isDeepStrictEqual(fetched, waited),
        list: {
          keys: Object.keys(page).sort(),
          ids: page.results.map((p) => p.id),
          next: page.next,
        },
        canceled: { id: canceled.id, status: canceled.status },
        wait_after_cancel: afterCancel.status,
        cancel_ended: cancelEnded,
        aborted: { output: aborted, first: abortCalls[0], last: abortCalls.at(-1) },
        webhooks: {
          secret_prefix: secret.key.slice(0, 6),
          statuses: receiver.deliveries.map((d) => JSON.parse(d.body).status),
          ids: receiver.deliveries.map((d) => JSON.parse(d.body).id),
          validations,
          last_equals_get: isDeepStrictEqual(JSON.parse(last.body), fetched),
          max_clock_skew: Math.max(
            ...receiver.deliveries.map((d) => Math.abs(now - d.headers["webhook-timestamp"])),
          ),
          forged_body: await validateWebhook({ headers: last.headers, body: forged }, secret.key),
          other_secret: await validateWebhook({ headers: last.headers, body: last.body }, otherKey),
        },
      };
    } finally {
      receiver.close();
    }
  },

  // replicate.paginate over several pages (the gateway's page size is small), in a
  // namespace of its own; another namespace's token cannot read those predictions.
  async pagination() {
    const other = new Replicate({ auth: otherAuth, baseUrl });
    const created = [];
    for (let i = 0; i < 5; i++) {
      const input = { audio_file: AUDIO };
      created.push(await other.predictions.create({ version: "whisperx", input }));
    }
    const ended = [];
    for (const prediction of created) {
      ended.push((await other.wait(prediction, { interval: 100 })).status);
    }
    const pages = [];
    for await (const page of other.paginate(other.predictions.list)) {
      pages.push(page.map((p) => p.id));
    }
    const first = await other.predictions.list();
    return {
      created: created.map((p) => p.id),
      ended,
      pages,
      next_is_absolute: first.next?.startsWith(`${new URL(baseUrl).origin}/v1/predictions?cursor=`),
      foreign_get: await failure(() => replicate.predictions.get(created[0].id)),
    };
  },

  // Local files (Buffer, File) as input: the client uploads them to the files API and
  // passes their signed URL, which the runner downloads.
  async files() {
    const audio = await readFile(process.env.WHISPERX_AUDIO_FILE);
    const fromBuffer = await replicate.run("acme/whisperx", { input: { audio_file: audio } });
    const file = new File([audio], "fox.wav", { type: "audio/wav" });
    const fromFile = await replicate.run("acme/whisperx", { input: { audio_file: file } });
    const created = await replicate.predictions.create({
      model: "acme/whisperx",
      input: { audio_file: audio },
    });
    const done = await replicate.wait(created, { interval: 100 });
    // Larger than the gateway's JSON body limit: uploads stream to the files API.
    const big = Buffer.alloc(3_000_000, 1);
    const fromBig = await replicate.run("acme/whisperx", { input: { audio_file: big } });
    const direct = await replicate.files.create(audio, { purpose: "js-client-test" });
    const listed = await replicate.files.list();
    const uploaded = listed.results.find((f) => f.name === "fox.wav");
    const got = await replicate.files.get(uploaded.id);
    const download = await fetch(uploaded.urls.get); // signed: no token
    const downloaded = Buffer.from(await download.arrayBuffer());
    const deleted = await replicate.files.delete(uploaded.id);
    const afterDelete = await failure(() => replicate.files.get(uploaded.id));
    // Not covered: fileEncodingStrategy "data-uri", which replicate 1.4.0 breaks itself
    // (it walks the client object instead of the input); data URIs as strings work.
    return {
      size: audio.length,
      from_buffer: fromBuffer,
      from_file: fromFile,
      created_input: created.input.audio_file,
      created_output: done.output,
      from_big: fromBig,
      direct: {
        name: direct.name,
        size: direct.size,
        metadata: direct.metadata,
        checksums: direct.checksums,
      },
      files: listed.results.map((f) => ({
        name: f.name,
        content_type: f.content_type,
        size: f.size,
      })),
      got_equals_listed: isDeepStrictEqual(got, uploaded),
      download: { status: download.status, same_bytes: downloaded.equals(audio) },
      deleted,
      after_delete: afterDelete,
    };
  },

  // One real transcription of WHISPERX_AUDIO_FILE, uploaded by the client (the pods suite).
  async cluster_transcribe() {
    const audio = await readFile(process.env.WHISPERX_AUDIO_FILE);
    const output = await replicate.run("whisperx/whisperx", {
      input: { audio_file: audio, align_output: false },
    });
    return { output };
  },

  // Errors surface as the client's ApiError with the HTTP status and the detail.
  async errors() {
    const stranger = new Replicate({ auth: "not-a-valid-token", baseUrl });
    return {
      bad_token: await failure(() => stranger.predictions.list()),
      bad_token_run: await failure(() =>
        stranger.run("acme/whisperx", { input: { audio_file: AUDIO } }),
      ),
      invalid_input: await failure(() =>
        replicate.run("acme/whisperx", { input: { audio_file: AUDIO, batch_size: 0 } }),
      ),
      missing_input: await failure(() => replicate.run("acme/whisperx", { input: {} })),
      unknown_model: await failure(() =>
        replicate.run("acme/unknown", { input: { audio_file: AUDIO } }),
      ),
      unknown_prediction: await failure(() => replicate.predictions.get("no-such-prediction")),
      failed_prediction: await failure(() =>
        replicate.run("acme/whisperx", {
          input: { audio_file: AUDIO, initial_prompt: "stand-in:fail" },
        }),
      ),
    };
  },
};

// The cluster path (tests/gateway/test_kube_backend.py): the operator runs the
// Prediction with its stand-in runner (tests/operator/fake_runner.py), scripted by the
// audio URL (WHISPERX_SUCCEED_URL, WHISPERX_HANG_URL).
sections.cluster_run = async () => {
  const receiver = await startReceiver();
  try {
    const succeed = { audio_file: process.env.WHISPERX_SUCCEED_URL };
    const output = await replicate.run("acme/whisperx", { input: succeed });
    const hanging = await replicate.predictions.create({
      model: "acme/whisperx",
      input: { audio_file: process.env.WHISPERX_HANG_URL },
      webhook: receiver.url,
    });
    const status = (d) => d.map((x) => JSON.parse(x.body).status);
    await receiver.until((d) => status(d).includes("processing"), 60_000);
    await replicate.predictions.cancel(hanging.id);
    const ended = await replicate.wait(hanging, { interval: 200 });
    await receiver.until((d) => status(d).includes("canceled"), 60_000);
    const secret = await replicate.webhooks.default.secret.get();
    const valid = [];
    for (const { headers, body } of receiver.deliveries) {
      valid.push(await validateWebhook({ headers, body }, secret.key));
    }
    return { output, status: ended.status, webhooks: status(receiver.deliveries), valid };
  } finally {
    receiver.close();
  }
};

const chosen = process.argv.slice(2);
// None named: every section for the local gateway (not the cluster's).
const names = chosen.length ? chosen : Object.keys(sections).filter((n) => !n.startsWith("cluster_"));
const result = {};
const run = async () => {
  for (const name of names) {
    if (!(name in sections)) throw new Error(`unknown section ${name}`);
    result[name] = await sections[name]();
  }
};
try {
  await withTimeout(run(), DEADLINE_MS, names.join(", "));
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(0);
} catch (err) {
  process.stderr.write(`${err.stack ?? err}\n`);
  process.exit(1);
}
