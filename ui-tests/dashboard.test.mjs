// The web dashboard in a real browser: Playwright (playwright-core) driving Debian's chromium, headless,
// against a real `tartarus server` with real process-lane sandboxes. Run by
// crates/tartarus-cli/tests/ui.rs, which starts the server and passes, in the environment:
//   TARTARUS_URL, TARTARUS_USER_KEY (team-a, user), TARTARUS_VIEWER_KEY (team-a, viewer),
//   TARTARUS_OTHER_KEY (team-b, user), TARTARUS_CHROMIUM (the browser), TARTARUS_SCREENSHOTS (a folder).
// Every wait has a deadline; any failed step, page error or dialog fails the run (exit 1).

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run this through crates/tartarus-cli/tests/ui.rs`);
  return value;
};
const base = env('TARTARUS_URL');
const keys = { user: env('TARTARUS_USER_KEY'), viewer: env('TARTARUS_VIEWER_KEY'), other: env('TARTARUS_OTHER_KEY') };
const shots = env('TARTARUS_SCREENSHOTS');
mkdirSync(shots, { recursive: true });

const WAIT = 15_000;

async function call(key, method, path, body) {
  const response = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

async function createSandbox(key, body) {
  const { status, body: record } = await call(key, 'POST', '/v1/sandboxes', body);
  assert.equal(status, 201, JSON.stringify(record));
  return record.id;
}

/** Polls `check` until it returns true; fails with `what` after the deadline. */
async function until(what, check, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeout} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

let stepNumber = 0;
async function step(name, run) {
  stepNumber += 1;
  const started = Date.now();
  try {
    await run();
    console.log(`ok ${stepNumber} - ${name} (${Date.now() - started} ms)`);
  } catch (err) {
    console.log(`not ok ${stepNumber} - ${name}`);
    throw err;
  }
}

/** A browser tab whose page errors and dialogs (an injected script would open one) fail the run. */
async function tab(browser) {
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('dialog', (dialog) => { problems.push(`dialog: ${dialog.message()}`); dialog.dismiss(); });
  // An answer the API refused is shown on the page; Chromium also logs it ("Failed to load resource").
  // Anything else logged as an error — a CSP violation, a script error — is a problem.
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) problems.push(`console error: ${msg.text()}`);
  });
  page.problems = problems;
  return page;
}

async function signIn(page, key, expectWho) {
  const response = await page.goto(`${base}/ui/`);
  assert.equal(response.status(), 200);
  const csp = response.headers()['content-security-policy'] || '';
  assert.match(csp, /script-src 'self'/, `the dashboard has a strict CSP: ${csp}`);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/, csp);
  await page.getByTestId('api-key').fill(key);
  await page.getByTestId('sign-in').click();
  await page.getByTestId('whoami').filter({ hasText: expectWho }).waitFor({ timeout: WAIT });
}

async function shot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

function noProblems(page) {
  assert.deepEqual(page.problems, [], 'the page had errors');
}

const headless = ['--headless=new', '--disable-gpu', '--disable-dev-shm-usage'];
// Root (CI) cannot use chromium's own sandbox; this browser only ever loads the loopback test server.
if (process.getuid && process.getuid() === 0) headless.push('--no-sandbox');
const browser = await chromium.launch({ executablePath: env('TARTARUS_CHROMIUM'), args: headless, timeout: 60_000 });
let exitCode = 0;
try {
  // Another tenant's sandbox, there before anyone signs in, and one whose label is markup.
  const theirs = await createSandbox(keys.other, { labels: { app: 'team-b-secret' } });
  const hostile = '<img src=x data-injected=1>';

  const page = await tab(browser);
  let ours;
  await step('a user key signs in and sees no live sandbox yet', async () => {
    await signIn(page, keys.user, 'team-a · user');
    await page.getByTestId('sandboxes').getByTestId('empty').waitFor({ timeout: WAIT });
    assert.equal(await page.evaluate(() => sessionStorage.getItem('tartarus.key') !== null), true);
  });

  await step('a sandbox created through the API appears live in the list', async () => {
    ours = await createSandbox(keys.user, {
      cmd: ['sh', '-c', 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done'],
      labels: { app: 'ui-test', note: hostile },
    });
    const row = page.locator(`[data-testid="sandbox-row"][data-id="${ours}"]`);
    await row.waitFor({ timeout: WAIT });
    await row.filter({ hasText: 'running' }).waitFor({ timeout: WAIT });
    await row.filter({ hasText: 'process' }).waitFor({ timeout: WAIT });
    await shot(page, '1-sandbox-list');
  });

  await step("another tenant's sandbox never appears, and labels are shown as text", async () => {
    assert.equal(await page.getByTestId('sandbox-row').count(), 1);
    const text = await page.locator('body').innerText();
    assert.ok(!text.includes(theirs) && !text.includes('team-b'), 'team-b data on team-a page');
    assert.ok(text.includes(hostile), 'the label is shown literally');
    assert.equal(await page.locator('[data-injected]').count(), 0, 'markup in a label became an element');
  });

  await step('opening the sandbox follows its log live', async () => {
    await page.getByTestId('sandbox-link').filter({ hasText: ours }).click();
    await page.getByTestId('sandbox-id').filter({ hasText: ours }).waitFor({ timeout: WAIT });
    const logs = page.getByTestId('logs');
    await logs.filter({ hasText: 'tick 2' }).waitFor({ timeout: WAIT });
    const seen = await logs.innerText();
    // Lines written after the page opened arrive without a reload.
    const later = Number(seen.trim().split('\n').pop().replace('tick ', '')) + 5;
    await logs.filter({ hasText: `tick ${later}` }).waitFor({ timeout: WAIT });
    await page.getByTestId('cpu-seconds').waitFor({ timeout: WAIT });
    await shot(page, '2-sandbox-logs');
  });

  await step('the kill button ends it and the page shows the end', async () => {
    await page.getByTestId('kill').click();
    await page.getByTestId('kill-confirm').click();
    await page.getByTestId('sandbox-state').filter({ hasText: 'killed' }).waitFor({ timeout: WAIT });
    await page.getByTestId('log-state').filter({ hasText: 'ended' }).waitFor({ timeout: WAIT });
    assert.equal(await page.getByTestId('kill').count(), 0, 'no kill button on an ended sandbox');
    const { body } = await call(keys.user, 'GET', `/v1/sandboxes/${ours}`);
    assert.equal(body.status, 'killed');
    await shot(page, '3-sandbox-killed');
  });

  await step('the audit page lists the kill', async () => {
    await page.goto(`${base}/ui/#/audit`);
    await page.getByTestId('action-filter').fill('sandbox.delete');
    await page.getByTestId('action-filter').dispatchEvent('change');
    await page.getByTestId('audit-row').filter({ hasText: ours }).filter({ hasText: 'sandbox.delete' })
      .waitFor({ timeout: WAIT });
    const rows = page.getByTestId('audit-row');
    await until('only sandbox.delete records are shown', async () =>
      (await rows.allInnerTexts()).every((text) => text.includes('sandbox.delete')));
    noProblems(page);
  });

  await step('a viewer key sees no kill button, and the API refuses the kill anyway', async () => {
    const live = await createSandbox(keys.user, { labels: { app: 'viewer-test' } });
    const viewer = await tab(browser);
    await signIn(viewer, keys.viewer, 'team-a · viewer');
    await viewer.goto(`${base}/ui/#/sandboxes/${live}`);
    await viewer.getByTestId('sandbox-state').filter({ hasText: 'running' }).waitFor({ timeout: WAIT });
    await viewer.getByTestId('cpu-seconds').waitFor({ timeout: WAIT });
    for (const button of ['kill', 'pause', 'resume']) {
      assert.equal(await viewer.getByTestId(button).count(), 0, `a viewer sees ${button}`);
    }
    const status = await viewer.evaluate(async (id) => {
      const response = await fetch(`/v1/sandboxes/${id}`, {
        method: 'DELETE', headers: { Authorization: `Bearer ${sessionStorage.getItem('tartarus.key')}` },
      });
      return response.status;
    }, live);
    assert.equal(status, 403, 'the API refuses a viewer');
    const { body } = await call(keys.user, 'GET', `/v1/sandboxes/${live}`);
    assert.equal(body.status, 'running');
    await shot(viewer, '4-viewer');
    noProblems(viewer);
    await viewer.context().close();
  });

  await step("another tenant's key sees only its own sandbox and a 404 for ours", async () => {
    const other = await tab(browser);
    await signIn(other, keys.other, 'team-b · user');
    const row = other.locator(`[data-testid="sandbox-row"][data-id="${theirs}"]`);
    await row.waitFor({ timeout: WAIT });
    assert.equal(await other.getByTestId('sandbox-row').count(), 1);
    await other.goto(`${base}/ui/#/sandboxes/${ours}`);
    await other.getByTestId('error').filter({ hasText: '404' }).waitFor({ timeout: WAIT });
    assert.ok(!(await other.getByTestId('logs').innerText()).includes('tick'), 'team-a logs shown to team-b');
    await other.goto(`${base}/ui/#/usage`);
    await other.getByTestId('tenant-usage-row').first().waitFor({ timeout: WAIT });
    const text = await other.locator('main').innerText();
    assert.ok(text.includes('team-b') && !text.includes('team-a') && !text.includes(ours), text);
    await shot(other, '5-other-tenant');
    await other.context().close();
  });

  await step('the other pages render without errors', async () => {
    for (const [hash, testid] of [['#/nodes', 'nodes'], ['#/queue', 'queue'], ['#/templates', 'templates'],
      ['#/policies', 'policies'], ['#/events', 'events'], ['#/usage', 'usage']]) {
      await page.goto(`${base}/ui/${hash}`);
      await page.getByTestId(testid).locator('table, p').first().waitFor({ timeout: WAIT });
      await shot(page, `6-${testid}`);
    }
    noProblems(page);
  });

  await step('signing out forgets the key', async () => {
    await page.getByTestId('sign-out').click();
    await page.getByTestId('login').waitFor({ timeout: WAIT });
    assert.equal(await page.evaluate(() => sessionStorage.getItem('tartarus.key')), null);
  });
  console.log(`${stepNumber} passed, 0 failed`);
} catch (err) {
  console.error(err);
  exitCode = 1;
} finally {
  await browser.close();
}
process.exit(exitCode);
