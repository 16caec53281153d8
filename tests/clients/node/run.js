#!/usr/bin/env node
// tests/clients/ runner for the official Node clients (ali-oss, @alicloud/credentials).
//
// Reads one JSON scenario on stdin and prints {"results": [...]} on stdout, one result per
// step, in order.  Steps never throw: a refused request is a result ({ok: false, status, code}).
// Scenario: {broker, apiKey, policy, client: {v4, refreshIntervalMs, provider}, steps: [{op, ...}]}
//   client.provider false: credentials come from GET /v1/credentials/<policy> (bearer header),
//     and refreshSTSToken returns the broker's reply UNCHANGED (ali-oss lower-cases its keys and
//     merges them into its options: lib/common/utils/setSTSToken.js).
//   client.provider true: @alicloud/credentials' credentials_uri provider, pointed at
//     /v1/credentials/<policy>?access_token=<key>, feeds ali-oss through refreshSTSToken.
// Nothing secret is printed: no key secret, token, API key or URL signature.
'use strict';

const crypto = require('crypto');
const dns = require('dns');
const OSS = require('ali-oss');
const Credential = require('@alicloud/credentials');

const counters = { brokerFetches: 0, refreshCalls: 0, providerCalls: 0 };

// Loopback only, whatever the broker answers: a name that is not localhost is never looked up
// (a clobbered endpoint would otherwise send DNS queries out), and every URL is checked.
const LOOPBACK = /^(localhost|127(\.\d{1,3}){3}|\[?::1\]?)$/;
const lookup = dns.lookup;
dns.lookup = function loopbackLookup(hostname, ...rest) {
  if (LOOPBACK.test(hostname)) return lookup.call(this, hostname, ...rest);
  const callback = rest[rest.length - 1];
  const err = Object.assign(new Error(`run.js: refused to resolve ${hostname} (loopback only)`), { code: 'ENOTFOUND' });
  process.nextTick(callback, err);
  return undefined;
};

function loopbackUrl(url) {
  const hostname = new URL(url).hostname;
  if (!LOOPBACK.test(hostname)) throw new Error(`run.js: ${hostname} is not a loopback address`);
  return url;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

async function brokerCredentials(scenario) {
  counters.brokerFetches += 1;
  const url = `${scenario.broker}/v1/credentials/${scenario.policy}`;
  const response = await fetch(loopbackUrl(url), { headers: { Authorization: `Bearer ${scenario.apiKey}` } });
  if (response.status !== 200) throw new Error(`broker answered ${response.status}`);
  return response.json();
}

async function brokerPost(scenario, path, body) {
  const response = await fetch(loopbackUrl(`${scenario.broker}${path}`), {
    method: 'POST',
    headers: { Authorization: `Bearer ${scenario.apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

// The reply's Oss object, as docs/api.md tells ali-oss users to read it: AddressStyle `path`
// is sldEnable, except for an IP-address endpoint, which ali-oss addresses by the Host header.
function ossOptions(location, client) {
  const ipEndpoint = /^[\d.]+$|^\[/.test(new URL(location.Endpoint).hostname);
  return {
    region: `oss-${location.Region}`,
    endpoint: loopbackUrl(location.Endpoint),
    bucket: location.Bucket,
    sldEnable: location.AddressStyle === 'path' && !ipEndpoint,
    cname: location.AddressStyle === 'cname',
    authorizationV4: Boolean(client.v4),
    refreshSTSTokenInterval: client.refreshIntervalMs ?? 300000,
  };
}

async function brokerClient(scenario, client) {
  const reply = await brokerCredentials(scenario);
  const oss = new OSS({
    ...ossOptions(reply.Oss, client),
    accessKeyId: reply.AccessKeyId,
    accessKeySecret: reply.AccessKeySecret,
    stsToken: reply.SecurityToken,
    refreshSTSToken: async () => {
      counters.refreshCalls += 1;
      return brokerCredentials(scenario); // the broker's reply, unchanged
    },
  });
  return { oss, reply };
}

async function providerClient(scenario, client) {
  const uri = `${scenario.broker}/v1/credentials/${scenario.policy}?access_token=${scenario.apiKey}`;
  const credential = new Credential.default({ type: 'credentials_uri', credentialsURI: uri });
  const fetchCredentials = async () => {
    counters.providerCalls += 1;
    const { accessKeyId, accessKeySecret, securityToken } = await credential.getCredential();
    return { accessKeyId, accessKeySecret, stsToken: securityToken };
  };
  // The OSS location is not part of a credentials provider's answer: it is configured.
  const oss = new OSS({
    ...ossOptions(scenario.location, client),
    ...(await fetchCredentials()),
    refreshSTSToken: fetchCredentials,
  });
  return { oss, reply: null };
}

// ali-oss signs no URL for an IP-address endpoint (lib/common/object/signatureUrl.js) and
// leaves the bucket out of URLs for one (lib/common/client/getReqUrl.js): for signed URLs the
// same emulator is named localhost, with the bucket in the path (sldEnable).
function urlClient(oss) {
  const endpoint = new URL(oss.options.endpoint.format());
  if (endpoint.hostname !== '127.0.0.1') return oss;
  endpoint.hostname = 'localhost';
  return new OSS({ ...oss.options, inited: false, endpoint: endpoint.origin, sldEnable: true });
}

function body(step) {
  if (step.body !== undefined) return Buffer.from(step.body, 'utf8');
  const size = step.size ?? 16;
  const block = crypto.createHash('sha256').update(step.key).digest();
  const data = Buffer.alloc(size);
  for (let offset = 0; offset < size; offset += block.length) block.copy(data, offset);
  return data;
}

function sha256(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

function refused(err) {
  return { ok: false, status: err.status ?? null, code: err.code ?? err.name ?? String(err) };
}

async function fetchResult(response) {
  const text = await response.text();
  const code = /<Code>([^<]*)<\/Code>/.exec(text);
  return { ok: response.ok, status: response.status, code: code ? code[1] : null, text: response.ok ? text : undefined };
}

const operations = {
  async put(ctx, step) {
    const result = await ctx.oss.put(step.key, body(step));
    return { ok: true, status: result.res.status };
  },
  async get(ctx, step) {
    const result = await ctx.oss.get(step.key);
    return { ok: true, status: result.res.status, sha256: sha256(result.content), size: result.content.length };
  },
  async head(ctx, step) {
    const result = await ctx.oss.head(step.key);
    return { ok: true, status: result.res.status, size: Number(result.res.headers['content-length']) };
  },
  async delete(ctx, step) {
    const result = await ctx.oss.delete(step.key);
    return { ok: true, status: result.res.status };
  },
  async list(ctx, step) {
    const query = { prefix: step.prefix, 'max-keys': step.maxKeys ?? 1000 };
    const result = step.version === 1 ? await ctx.oss.list(query, {}) : await ctx.oss.listV2(query, {});
    return { ok: true, status: result.res.status, keys: (result.objects || []).map((o) => o.name) };
  },
  async multipart(ctx, step) {
    const data = body(step);
    const result = await ctx.oss.multipartUpload(step.key, data, { partSize: step.partSize, parallel: 2 });
    return { ok: true, status: result.res.status, sha256: sha256(data), size: data.length };
  },
  async signedUrl(ctx, step) {
    const method = step.method ?? 'GET';
    const signer = ctx.scenario.client && ctx.scenario.client.urlsOnLocalhost ? urlClient(ctx.oss) : ctx.oss;
    const url = step.v4
      ? await signer.signatureUrlV4(method, 600, { headers: {} }, step.key)
      : signer.signatureUrl(step.key, { method, expires: 600 });
    const init = { method };
    if (method === 'PUT') init.body = body(step);
    const result = await fetchResult(await fetch(loopbackUrl(url), init));
    const signature = new URL(url).searchParams;
    result.version = signature.has('x-oss-signature') ? 'V4' : signature.has('Signature') ? 'V1' : null;
    result.sha256 = result.text === undefined ? undefined : sha256(Buffer.from(result.text));
    delete result.text;
    return result;
  },
  async presign(ctx, step) {
    const request = { policy: ctx.scenario.policy, key: step.key, method: step.method ?? 'PUT' };
    // A policy with max_object_bytes signs the upload's size: ask for this body's.
    if (request.method === 'PUT') request.content_length = body(step).length;
    const signed = await brokerPost(ctx.scenario, '/v1/presign', request);
    if (signed.status !== 200) return { ok: false, status: signed.status, code: signed.body.error.code, by: 'broker' };
    const init = { method: signed.body.method, headers: signed.body.signed_headers };
    if (init.method === 'PUT') init.body = body(step);
    const result = await fetchResult(await fetch(loopbackUrl(signed.body.url), init));
    delete result.text;
    return { ...result, by: 'oss' };
  },
  async postForm(ctx, step) {
    const request = { policy: ctx.scenario.policy, ...(step.request ?? {}) };
    const signed = await brokerPost(ctx.scenario, '/v1/post-policy', request);
    if (signed.status !== 200) return { ok: false, status: signed.status, code: signed.body.error.code, by: 'broker' };
    const form = new FormData();
    for (const [name, value] of Object.entries(signed.body.fields)) {
      form.append(name, name === 'key' && step.key !== undefined ? step.key : value);
    }
    form.append('file', new Blob([body(step)]), 'upload.bin');
    const result = await fetchResult(await fetch(loopbackUrl(signed.body.host), { method: 'POST', body: form }));
    delete result.text;
    return { ...result, by: 'oss', host: signed.body.host };
  },
  async options(ctx) {
    // What the client's options hold now: refreshSTSToken's reply must not clobber them.
    const { endpoint, region, bucket, accessKeyId } = ctx.oss.options;
    return {
      ok: true,
      endpoint: typeof endpoint === 'object' && endpoint !== null ? endpoint.format() : String(endpoint),
      region,
      bucket,
      accessKeyIdMatchesReply: ctx.reply !== null && accessKeyId === ctx.reply.AccessKeyId,
    };
  },
  async counters() {
    return { ok: true, ...counters };
  },
};

async function run(ctx, step) {
  const operation = operations[step.op];
  if (!operation) throw new Error(`unknown op ${step.op}`);
  try {
    return { op: step.op, key: step.key, ...(await operation(ctx, step)) };
  } catch (err) {
    return { op: step.op, key: step.key, ...refused(err) };
  }
}

async function main() {
  const scenario = await readStdin();
  const client = scenario.client ?? {};
  const { oss, reply } = client.provider ? await providerClient(scenario, client) : await brokerClient(scenario, client);
  const ctx = { scenario, oss, reply };
  const results = [];
  for (const step of scenario.steps) {
    const repeat = step.repeat ?? 1;
    for (let index = 0; index < repeat; index += 1) {
      const key = step.repeat ? step.key.replace('{i}', String(index)) : step.key;
      results.push(await run(ctx, { ...step, key }));
    }
  }
  process.stdout.write(JSON.stringify({ results }));
}

main().catch((err) => {
  process.stderr.write(`run.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
