'use strict';
// node-postgres (pg 8.x) through pgsplit. Every case checks its results and
// where each statement ran: `inet_server_port()` is the replica's port for a
// read outside a transaction block, the primary's for writes, transaction
// blocks and sessions pinned by LISTEN.
//
// Env: PGSPLIT_URL, PGSPLIT_PRIMARY_PORT, PGSPLIT_REPLICA_PORT,
// PGSPLIT_DIRECT_PRIMARY_URL. Replication is synchronous (remote_apply), so
// a read after a committed write sees it.

const pg = require('pg');

const URL = need('PGSPLIT_URL');
const DIRECT = need('PGSPLIT_DIRECT_PRIMARY_URL');
const PRIMARY = port('PGSPLIT_PRIMARY_PORT');
const REPLICA = port('PGSPLIT_REPLICA_PORT');
// Set when replication is asynchronous and the replica replays late: a read
// may then rightly run on the primary (read-your-writes); results are still
// checked.
const LAG_MS = Number(process.env.PGSPLIT_CLIENTS_LAG_MS || 0);
const CASE_TIMEOUT_MS = 60000;
const NOTIFY_WAIT_MS = 5000;

const TABLES = ['node_params', 'node_simple', 'node_prep', 'node_tx', 'node_listen', 'node_pool'];

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`node: ${name} is not set`);
    process.exit(2);
  }
  return v;
}

function port(name) {
  const p = Number(need(name));
  if (!Number.isInteger(p) || p <= 0 || p > 65535) {
    console.error(`node: ${name}=${process.env[name]} is not a port`);
    process.exit(2);
  }
  return p;
}

function fail(msg) {
  throw new Error(msg);
}

function eq(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) fail(`${what}: expected ${e}, got ${a}`);
}

function onPrimary(p, what) {
  if (p !== PRIMARY) fail(`${what}: ran on port ${p}, expected the primary (${PRIMARY}); replica is ${REPLICA}`);
}

function onReplica(p, what) {
  if (LAG_MS && p === PRIMARY) return;
  if (p !== REPLICA) fail(`${what}: ran on port ${p}, expected the replica (${REPLICA}); primary is ${PRIMARY}`);
}

function one(res, what) {
  if (res.rows.length !== 1) fail(`${what}: expected 1 row, got ${res.rows.length}: ${JSON.stringify(res.rows)}`);
  return res.rows[0];
}

async function expectError(promise, sqlstate, what) {
  let err = null;
  try {
    await promise;
  } catch (e) {
    err = e;
  }
  if (err === null) fail(`${what}: succeeded, expected SQLSTATE ${sqlstate}`);
  if (err.code !== sqlstate) fail(`${what}: expected SQLSTATE ${sqlstate}, got ${err.code}: ${err.message}`);
  return err;
}

function clientConfig(url) {
  return { connectionString: url, connectionTimeoutMillis: 10000, query_timeout: 30000 };
}

// Connects a client; `opened` collects it so the case can close it whatever happens.
async function connect(opened, url = URL) {
  const c = new pg.Client(clientConfig(url));
  // An error on an idle client (e.g. the connection dropped) must not crash
  // the process; the next query on it fails and the case reports that.
  c.on('error', (e) => console.error(`node: client error: ${e.message}`));
  opened.push(c);
  await c.connect();
  return c;
}

async function readPort(c, what) {
  return one(await c.query('SELECT inet_server_port() AS port'), what).port;
}

// ---------------------------------------------------------------- cases

async function parameterised(opened) {
  const c = await connect(opened);
  await c.query(
    'CREATE TABLE node_params (id int PRIMARY KEY, name text, score numeric, tags text[], big bigint, flag boolean)'
  );
  const rows = [
    [1, "O'Brien; DROP TABLE node_params --", '12.50', ['a', 'b c'], '9007199254740993', true],
    [2, 'Grüße, 世界 $1 \\x', '-0.001', [], '-1', false],
    [3, null, null, null, null, null],
  ];
  for (const r of rows) {
    const res = await c.query(
      'INSERT INTO node_params (id, name, score, tags, big, flag) VALUES ($1, $2, $3, $4, $5, $6) RETURNING inet_server_port() AS port',
      r
    );
    eq(res.rowCount, 1, `insert ${r[0]} rowCount`);
    onPrimary(one(res, `insert ${r[0]}`).port, `parameterised INSERT of id ${r[0]}`);
  }
  for (const r of rows) {
    const row = one(
      await c.query(
        'SELECT inet_server_port() AS port, name, score, tags, big::text AS big, flag FROM node_params WHERE id = $1',
        [r[0]]
      ),
      `select id ${r[0]}`
    );
    onReplica(row.port, `parameterised SELECT of id ${r[0]}`);
    eq([row.name, row.score, row.tags, row.big, row.flag], r.slice(1), `row ${r[0]} read back`);
  }
  const upd = await c.query(
    'UPDATE node_params SET name = $1 WHERE id = ANY($2::int[]) RETURNING id, inet_server_port() AS port',
    ['renamed', [1, 3]]
  );
  eq(upd.rowCount, 2, 'UPDATE rowCount');
  for (const r of upd.rows) onPrimary(r.port, `parameterised UPDATE of id ${r.id}`);
  const after = await c.query(
    'SELECT inet_server_port() AS port, array_agg(id ORDER BY id) AS ids FROM node_params WHERE name = $1',
    ['renamed']
  );
  onReplica(one(after, 'read after update').port, 'read after the UPDATE');
  eq(after.rows[0].ids, [1, 3], 'ids renamed by the UPDATE');
  // A parameter is data, never SQL: the injection-looking text above is stored as is.
  const cnt = one(await c.query('SELECT count(*)::int AS n FROM node_params WHERE name LIKE $1', ['%DROP%']), 'count');
  eq(cnt.n, 0, 'rows still named like the first insert after renaming');
  eq(one(await c.query('SELECT count(*)::int AS n FROM node_params'), 'count all').n, 3, 'rows in node_params');
}

async function simpleProtocol(opened) {
  const c = await connect(opened);
  // Without values node-postgres sends a simple Query; several statements in
  // one string run on the primary if any of them needs it.
  await c.query('CREATE TABLE node_simple (id int PRIMARY KEY)');
  onReplica(await readPort(c, 'plain read'), 'simple-protocol SELECT');
  const reads = await c.query('SELECT 1 AS one; SELECT inet_server_port() AS port');
  eq(reads.length, 2, 'results of a two-SELECT string');
  onReplica(one(reads[1], 'second result').port, 'two SELECTs in one simple query');
  const mixed = await c.query('INSERT INTO node_simple VALUES (1); SELECT inet_server_port() AS port, count(*)::int AS n FROM node_simple');
  eq(mixed.length, 2, 'results of an INSERT+SELECT string');
  eq(mixed[0].rowCount, 1, 'INSERT rowCount in a multi-statement string');
  const m = one(mixed[1], 'SELECT after INSERT');
  onPrimary(m.port, 'SELECT in the same simple query as an INSERT');
  eq(m.n, 1, 'the SELECT sees the INSERT of its own string');
  // The same read through the extended protocol without parameters.
  const ext = await c.query({ text: 'SELECT inet_server_port() AS port, count(*)::int AS n FROM node_simple', queryMode: 'extended' });
  onReplica(one(ext, 'extended read').port, 'extended-protocol SELECT without parameters');
  eq(ext.rows[0].n, 1, 'extended read of the committed row');
  // A hint comment sends a read to the primary.
  const hinted = await c.query('/* pgsplit:primary */ SELECT inet_server_port() AS port');
  onPrimary(one(hinted, 'hinted read').port, 'SELECT with a pgsplit:primary hint');
  onReplica(await readPort(c, 'read after the hinted one'), 'SELECT after the hinted one');
}

async function namedPrepared(opened) {
  const c = await connect(opened);
  await c.query('CREATE TABLE node_prep (id int PRIMARY KEY, v text NOT NULL)');
  const read = (id) => ({
    name: 'node_read',
    text: 'SELECT inet_server_port() AS port, v FROM node_prep WHERE id = $1',
    values: [id],
  });
  const write = (id, v) => ({
    name: 'node_write',
    text: 'INSERT INTO node_prep (id, v) VALUES ($1, $2) RETURNING inet_server_port() AS port',
    values: [id, v],
  });
  // Prepared first as a read (on the replica), then each statement used
  // repeatedly, alternating, so both servers need both statements' names.
  const missing = await c.query(read(0));
  eq(missing.rowCount, 0, 'named read of a missing id');
  for (let i = 1; i <= 6; i++) {
    const w = await c.query(write(i, `value ${i}`));
    onPrimary(one(w, `named write ${i}`).port, `named prepared INSERT, use ${i}`);
    const r = one(await c.query(read(i)), `named read ${i}`);
    onReplica(r.port, `named prepared SELECT, use ${i}`);
    eq(r.v, `value ${i}`, `named read ${i} value`);
  }
  // The same named read inside a transaction block runs on the primary and
  // sees the block's own uncommitted write.
  await c.query('BEGIN');
  onPrimary(one(await c.query(write(100, 'in block')), 'write in block').port, 'named INSERT inside BEGIN');
  const inBlock = one(await c.query(read(100)), 'read in block');
  onPrimary(inBlock.port, 'named SELECT inside BEGIN');
  eq(inBlock.v, 'in block', 'named read of the block’s own write');
  await c.query('ROLLBACK');
  eq((await c.query(read(100))).rowCount, 0, 'named read of a rolled-back row');
  const again = one(await c.query(read(3)), 'named read after the block');
  onReplica(again.port, 'named SELECT after the block');
  eq(again.v, 'value 3', 'named read after the block');
  // A second client has its own statements with the same names.
  const c2 = await connect(opened);
  const r2 = one(await c2.query(read(6)), 'named read from a second client');
  onReplica(r2.port, 'named SELECT from a second client');
  eq(r2.v, 'value 6', 'second client read');
  await expectError(c2.query(write(6, 'duplicate')), '23505', 'named write of a duplicate id');
  onPrimary(one(await c2.query(write(7, 'seven')), 'second client write').port, 'named INSERT after an error');
  eq(one(await c.query(read(7)), 'read 7').v, 'seven', 'first client sees the second client’s write');
}

async function transaction(opened) {
  const c = await connect(opened);
  await c.query('CREATE TABLE node_tx (id int PRIMARY KEY, v text)');
  onReplica(await readPort(c, 'read before the block'), 'read before BEGIN');

  await c.query('BEGIN');
  onPrimary(await readPort(c, 'first read in block'), 'SELECT right after BEGIN');
  const ins = await c.query('INSERT INTO node_tx VALUES ($1, $2) RETURNING inet_server_port() AS port', [1, 'one']);
  onPrimary(one(ins, 'insert in block').port, 'INSERT inside BEGIN');
  const seen = one(await c.query('SELECT inet_server_port() AS port, count(*)::int AS n FROM node_tx'), 'count in block');
  onPrimary(seen.port, 'SELECT inside BEGIN after a write');
  eq(seen.n, 1, 'the block sees its own write');
  await c.query('COMMIT');
  const committed = one(
    await c.query('SELECT inet_server_port() AS port, v FROM node_tx WHERE id = $1', [1]),
    'read after commit'
  );
  onReplica(committed.port, 'read after COMMIT');
  eq(committed.v, 'one', 'committed row');

  // An error inside a block: the SQLSTATE reaches the client, the block is
  // aborted (25P02) until ROLLBACK, and nothing of it stays.
  await c.query('BEGIN');
  onPrimary(
    one(await c.query('INSERT INTO node_tx VALUES (2, $1) RETURNING inet_server_port() AS port', ['two']), 'insert 2').port,
    'INSERT before the error'
  );
  const dup = await expectError(c.query('INSERT INTO node_tx VALUES ($1, $2)', [1, 'dup']), '23505', 'duplicate key in block');
  if (!/node_tx_pkey/.test(dup.constraint || dup.message)) fail(`duplicate key error names no constraint: ${dup.message}`);
  await expectError(c.query('SELECT 1'), '25P02', 'statement in an aborted block');
  await expectError(c.query('SELECT $1::int', [1]), '25P02', 'extended-protocol statement in an aborted block');
  await c.query('ROLLBACK');
  const rolled = one(
    await c.query('SELECT inet_server_port() AS port, array_agg(id ORDER BY id) AS ids FROM node_tx'),
    'read after rollback'
  );
  onReplica(rolled.port, 'read after ROLLBACK');
  eq(rolled.ids, [1], 'rows after the rollback');

  // An error outside a block leaves the session usable.
  await expectError(c.query('SELECT 1/0'), '22012', 'division by zero outside a block');
  await expectError(c.query('SELECT * FROM node_tx_missing'), '42P01', 'unknown table');
  onReplica(await readPort(c, 'read after errors'), 'read after errors outside a block');
}

async function listenNotify(opened) {
  const listener = await connect(opened);
  const notifier = await connect(opened);
  await notifier.query('CREATE TABLE node_listen (id int PRIMARY KEY)');
  onReplica(await readPort(listener, 'listener before LISTEN'), 'listener’s read before LISTEN');

  const received = [];
  let wake = null;
  listener.on('notification', (msg) => {
    received.push(msg);
    if (wake) wake();
  });
  const waitFor = async (count, what) => {
    const deadline = Date.now() + NOTIFY_WAIT_MS;
    while (received.length < count) {
      const left = deadline - Date.now();
      if (left <= 0) fail(`${what}: no notification within ${NOTIFY_WAIT_MS} ms (received ${received.length} of ${count})`);
      await new Promise((resolve) => {
        wake = resolve;
        setTimeout(resolve, left);
      });
      wake = null;
    }
  };

  // A named statement prepared before LISTEN (on the replica) is used after it (on the primary).
  const named = { name: 'node_listen_port', text: 'SELECT inet_server_port() AS port, $1::int + 1 AS n', values: [1] };
  const before = one(await listener.query(named), 'named read before LISTEN');
  onReplica(before.port, 'listener’s named read before LISTEN');
  await listener.query('LISTEN node_chan');
  onPrimary(await readPort(listener, 'listener after LISTEN'), 'listener’s read after LISTEN (session pinned)');
  const afterListen = one(await listener.query({ ...named, values: [41] }), 'named read after LISTEN');
  onPrimary(afterListen.port, 'listener’s named read after LISTEN');
  eq(afterListen.n, 42, 'named read after LISTEN');
  onPrimary(
    one(await listener.query('SELECT inet_server_port() AS port, $1::text AS t', ['x']), 'extended read').port,
    'listener’s parameterised read after LISTEN'
  );
  // The notifier is not pinned.
  onReplica(await readPort(notifier, 'notifier read'), 'notifier’s read');

  await notifier.query("NOTIFY node_chan, 'hello from node'");
  await waitFor(1, 'NOTIFY with payload');
  eq([received[0].channel, received[0].payload], ['node_chan', 'hello from node'], 'first notification');

  const viaFn = await notifier.query('SELECT pg_notify($1, $2), inet_server_port() AS port', ['node_chan', 'payload 2']);
  onPrimary(one(viaFn, 'pg_notify').port, 'pg_notify() (a writing function)');
  await waitFor(2, 'pg_notify with payload');
  eq([received[1].channel, received[1].payload], ['node_chan', 'payload 2'], 'second notification');

  // A notification sent inside a transaction block arrives at COMMIT only.
  await notifier.query('BEGIN');
  await notifier.query("NOTIFY node_chan, 'at commit'");
  await notifier.query('INSERT INTO node_listen VALUES (1)');
  eq(received.length, 2, 'notifications before COMMIT');
  await notifier.query('COMMIT');
  await waitFor(3, 'NOTIFY inside a committed block');
  eq(received[2].payload, 'at commit', 'third notification');

  // A notification for another channel does not arrive.
  await notifier.query("NOTIFY node_other_chan, 'not for us'");
  await notifier.query("NOTIFY node_chan, 'last'");
  await waitFor(4, 'last NOTIFY');
  eq(
    received.map((m) => m.payload),
    ['hello from node', 'payload 2', 'at commit', 'last'],
    'payloads received by the listener'
  );
  const row = one(
    await listener.query('SELECT inet_server_port() AS port, count(*)::int AS n FROM node_listen'),
    'listener reads the table'
  );
  onPrimary(row.port, 'listener’s read after the notifications (still pinned)');
  eq(row.n, 1, 'rows in node_listen');
}

async function pool(opened) {
  const p = new pg.Pool({ ...clientConfig(URL), max: 8 });
  p.on('error', (e) => console.error(`node: idle pool client error: ${e.message}`));
  opened.push({ end: () => p.end() });
  await p.query('CREATE TABLE node_pool (id int PRIMARY KEY, v text)');

  const N = 24;
  const tasks = [];
  for (let i = 0; i < N; i++) {
    tasks.push(
      p
        .query('INSERT INTO node_pool VALUES ($1, $2) RETURNING inet_server_port() AS port, pg_backend_pid() AS pid', [i, `v${i}`])
        .then((r) => ({ kind: 'write', i, ...one(r, `pool insert ${i}`) }))
    );
    // The reads sleep a little so that the pool really opens several connections.
    tasks.push(
      p
        .query('SELECT inet_server_port() AS port, pg_backend_pid() AS pid, $1::int AS i, pg_sleep(0.05) IS NULL AS slept', [i])
        .then((r) => ({ kind: 'read', ...one(r, `pool read ${i}`) }))
    );
  }
  const results = await Promise.all(tasks);
  for (const r of results) {
    if (r.kind === 'write') onPrimary(r.port, `pool INSERT ${r.i}`);
    else onReplica(r.port, `pool SELECT ${r.i}`);
  }
  const readPids = new Set(results.filter((r) => r.kind === 'read').map((r) => r.pid));
  if (readPids.size < 2) fail(`pool reads ran on ${readPids.size} replica backend(s); expected concurrent ones`);
  if (p.totalCount < 2) fail(`pool opened ${p.totalCount} connection(s); expected several for concurrent queries`);

  const all = one(
    await p.query('SELECT inet_server_port() AS port, count(*)::int AS n, sum(id)::int AS s FROM node_pool'),
    'pool count'
  );
  onReplica(all.port, 'pool read after the concurrent writes');
  eq([all.n, all.s], [N, (N * (N - 1)) / 2], 'rows written through the pool');

  // A transaction on a checked-out client, concurrent with pool reads; the
  // client goes back to the pool and its next read is on the replica again.
  const tx = await p.connect();
  let released = false;
  try {
    await tx.query('BEGIN');
    const upd = await tx.query('UPDATE node_pool SET v = $1 WHERE id < 5 RETURNING inet_server_port() AS port', ['tx']);
    eq(upd.rowCount, 5, 'rows updated inside the block');
    for (const r of upd.rows) onPrimary(r.port, 'pool client UPDATE inside BEGIN');
    const during = await Promise.all(
      [0, 1, 2, 3].map((i) => p.query('SELECT inet_server_port() AS port, v FROM node_pool WHERE id = $1', [i]))
    );
    for (const [i, r] of during.entries()) {
      const row = one(r, `read during tx ${i}`);
      onReplica(row.port, `pool read during another client's transaction (${i})`);
      eq(row.v, `v${i}`, `pool read of id ${i} does not see the uncommitted update`);
    }
    await tx.query('COMMIT');
    onReplica(await readPort(tx, 'checked-out client after COMMIT'), 'checked-out client’s read after COMMIT');
    tx.release();
    released = true;
  } finally {
    if (!released) tx.release(true);
  }
  const updated = one(
    await p.query("SELECT inet_server_port() AS port, count(*)::int AS n FROM node_pool WHERE v = 'tx'"),
    'count updated'
  );
  onReplica(updated.port, 'pool read after the committed transaction');
  eq(updated.n, 5, 'rows updated by the transaction');
}

const CASES = [
  ['parameterised queries', parameterised],
  ['simple query protocol, multi-statement strings', simpleProtocol],
  ['named prepared queries', namedPrepared],
  ['transaction: commit, rollback after an error', transaction],
  ['LISTEN/NOTIFY', listenNotify],
  ['pg.Pool with concurrent queries', pool],
];

// ---------------------------------------------------------------- runner

function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

async function prepare() {
  const admin = new pg.Client(clientConfig(DIRECT));
  await admin.connect();
  try {
    if (PRIMARY === REPLICA) fail(`PGSPLIT_PRIMARY_PORT and PGSPLIT_REPLICA_PORT are both ${PRIMARY}`);
    onPrimary(await readPort(admin, 'direct primary'), 'PGSPLIT_DIRECT_PRIMARY_URL');
    await admin.query(`DROP TABLE IF EXISTS ${TABLES.join(', ')}`);
  } finally {
    await admin.end();
  }
}

async function main() {
  console.log(`node: node ${process.version}, pg ${require('pg/package.json').version}`);
  try {
    await withTimeout(prepare(), CASE_TIMEOUT_MS, 'preparing');
  } catch (e) {
    console.error(`node: cannot prepare the cases: ${e.message}`);
    process.exit(2);
  }
  const only = process.argv.slice(2);
  let passed = 0;
  const failed = [];
  for (const [name, fn] of CASES) {
    if (only.length && !only.some((o) => name.includes(o))) continue;
    const opened = [];
    const t0 = Date.now();
    try {
      await withTimeout(fn(opened), CASE_TIMEOUT_MS, name);
      passed++;
      console.log(`ok   node/${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed.push(name);
      console.log(`FAIL node/${name}: ${e.message}`);
      if (process.env.PGSPLIT_CLIENTS_VERBOSE) console.log(e.stack);
    } finally {
      await Promise.all(
        opened.map((c) => withTimeout(Promise.resolve().then(() => c.end()), 5000, 'closing').catch(() => {}))
      );
    }
  }
  console.log(`node: ${passed} passed, ${failed.length} failed`);
  for (const f of failed) console.log(`  failed: node/${f}`);
  // Exit explicitly: a client stuck in a hung case must not keep the process alive.
  process.exit(failed.length ? 1 : 0);
}

main().catch((e) => {
  console.error(`node: ${e.stack || e}`);
  process.exit(2);
});
