// One sandbox: its record and usage (polled), its main command's log followed live, its events, exec
// history (from the audit trail) and tool-call receipts, and the buttons its caller's role allows.

import { api, every, follow, query } from './api.js';
import { badge, bytes, errorText, fill, h, num, table, when } from './dom.js';

const POLL_MS = 1000;
const RECORDS_POLL_MS = 3000;

const isLive = (s) => s.status === 'starting' || s.status === 'running' || s.status === 'paused';

function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.flatMap(([k, v, testid]) => [h('dt', {}, k), h('dd', { testid }, v)]));
}

export function page(main, { me, params: [id], signal }) {
  const path = `/v1/sandboxes/${encodeURIComponent(id)}`;
  const state = h('span', { testid: 'sandbox-state' });
  const actions = h('div', { class: 'toolbar', testid: 'actions' });
  const message = h('p', { class: 'error', testid: 'action-error' });
  const details = h('div');
  const usage = h('div', { testid: 'usage' });
  const logs = h('pre', { class: 'logs', testid: 'logs' });
  const logState = h('span', { class: 'muted', testid: 'log-state' }, 'connecting…');
  const events = h('div', { testid: 'events' });
  const execs = h('div', { testid: 'execs' });
  const receipts = h('div', { testid: 'receipts' });
  fill(main,
    h('p', {}, h('a', { href: '#/sandboxes' }, '← Sandboxes')),
    h('h1', {}, 'Sandbox ', h('code', { testid: 'sandbox-id' }, id), ' ', state),
    actions, message, details,
    h('h2', {}, 'Usage'), usage,
    h('h2', {}, 'Log ', logState), logs,
    h('h2', {}, 'Events'), events,
    h('h2', {}, 'Exec history'), execs,
    h('h2', {}, 'Tool-call receipts'), receipts);

  let shownActions = '';
  const act = async (verb) => {
    fill(message);
    try {
      if (verb === 'kill') await api(path, { method: 'DELETE', signal });
      else await api(`${path}/${verb}`, { method: 'POST', signal });
    } catch (err) {
      fill(message, err.message);
    }
    shownActions = '';
  };
  const renderActions = (record) => {
    // The buttons mirror the key's role; the API refuses what the role may not do either way.
    const key = `${record.status}:${me.can_mutate}`;
    if (key === shownActions) return;
    shownActions = key;
    if (!me.can_mutate || !isLive(record)) return fill(actions);
    const kill = h('button', { type: 'button', class: 'danger', testid: 'kill' }, 'Kill');
    kill.addEventListener('click', () => {
      const confirm = h('button', { type: 'button', class: 'danger', testid: 'kill-confirm', onclick: () => act('kill') }, 'Really kill');
      kill.replaceWith(confirm);
    });
    fill(actions,
      record.status === 'paused'
        ? h('button', { type: 'button', testid: 'resume', onclick: () => act('resume') }, 'Resume')
        : h('button', { type: 'button', testid: 'pause', onclick: () => act('pause') }, 'Pause'),
      kill);
  };

  let logsStarted = false;
  const startLogs = () => {
    logsStarted = true;
    fill(logState, 'following');
    follow(`${path}/logs${query({ follow: 'true' })}`, (text) => {
      const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
      logs.append(document.createTextNode(text));
      if (atBottom) logs.scrollTop = logs.scrollHeight;
    }, signal).then(() => fill(logState, 'ended')).catch((err) => {
      if (err.name !== 'AbortError') fill(logState, `stopped: ${err.message}`);
    });
  };

  every(POLL_MS, signal, async () => {
    const [record, used] = await Promise.all([api(path, { signal }), api(`${path}/usage`, { signal })]);
    fill(state, badge(record.status));
    renderActions(record);
    fill(details, facts([
      ['Tenant', record.tenant],
      ['Lane', record.runtime, 'lane'],
      ['Why this lane', record.runtime_reason || '—'],
      ['Node', record.node || 'this server'],
      ['Placement', record.placement || '—'],
      ['Template', record.template || '—'],
      ['Created', when(record.created_ms)],
      ['Finished', when(record.finished_ms)],
      ['Exit code', record.exit_code ?? '—', 'exit-code'],
      ['Reason', record.reason || '—', 'reason'],
      ['Labels', Object.entries(record.labels || {}).map(([k, v]) => `${k}=${v}`).join(' ') || '—'],
    ]));
    fill(usage, facts([
      ['CPU', `${num(used.cpu_seconds, 3)} s`, 'cpu-seconds'],
      ['Memory × time', `${num(used.memory_gib_seconds, 4)} GiB·s`],
      ['Memory now', bytes(used.memory_bytes), 'memory-now'],
      ['Peak memory', bytes(used.peak_memory_bytes)],
      ['Egress', used.egress_counted ? bytes(used.egress_bytes) : 'not counted by this lane'],
      ['Tool calls', used.tool_calls],
      ['Snapshots', bytes(used.snapshot_bytes)],
      ['Cost', used.cost ? `${num(used.cost.total, 6)} ${used.cost.currency}` : 'no price table'],
    ]));
    if (!logsStarted) startLogs();
  }, (err) => fill(details, errorText(err)));

  every(RECORDS_POLL_MS, signal, async () => {
    const [evs, audit, recs] = await Promise.all([
      api(`/v1/events${query({ sandbox: id, limit: 200 })}`, { signal }),
      api('/v1/audit', { signal }),
      api(`/v1/receipts${query({ sandbox: id })}`, { signal }),
    ]);
    fill(events, table([
      ['When', (e) => when(e.at_ms)], ['Category', (e) => e.category], ['Kind', (e) => e.kind], ['Message', (e) => e.message],
    ], evs, () => ({ testid: 'event-row' }), 'No events.'));
    const ran = audit.filter((a) => a.target === id && a.action === 'sandbox.exec').slice(0, 200);
    fill(execs, table([
      ['When', (a) => when(a.at_ms)], ['Key', (a) => a.key_id || '—'], ['Outcome', (a) => a.outcome],
    ], ran, () => ({ testid: 'exec-row' }), 'No execs.'));
    fill(receipts, table([
      ['Started', (r) => when(r.started_at)], ['Tool', (r) => r.tool], ['Status', (r) => r.status],
      ['Code', (r) => r.code ?? '—'], ['Receipt', (r) => h('code', {}, r.id)],
    ], recs, () => ({ testid: 'receipt-row' }), 'No tool calls.'));
  }, (err) => fill(events, errorText(err)));
}
