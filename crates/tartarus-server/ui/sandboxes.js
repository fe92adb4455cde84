// The sandbox list, live: polled every second with each live sandbox's CPU and memory.

import { api, every, query } from './api.js';
import { age, badge, bytes, errorText, fill, h, num, table } from './dom.js';

const POLL_MS = 1000;

function laneOf(s) { return s.runtime || 'process'; }

export function list(main, { me, signal }) {
  const filter = h('select', { testid: 'status-filter' },
    h('option', { value: 'live' }, 'live'),
    h('option', { value: 'all' }, 'all'),
    h('option', { value: 'ended' }, 'ended'));
  const body = h('div', { testid: 'sandboxes' });
  const status = h('span', { class: 'muted', testid: 'updated' });
  fill(main, h('h1', {}, 'Sandboxes'), h('div', { class: 'toolbar' }, 'Show ', filter, status), body);
  const refresh = async () => {
    const wanted = filter.value;
    const since = wanted === 'live' ? Date.now() : 0;
    const [all, usage] = await Promise.all([
      api('/v1/sandboxes', { signal }),
      api(`/v1/usage${query({ since, limit: 1000 })}`, { signal }),
    ]);
    const used = new Map(usage.sandboxes.map((u) => [u.sandbox, u]));
    const live = (s) => s.status === 'starting' || s.status === 'running' || s.status === 'paused';
    const shown = all.filter((s) => wanted === 'all' || (wanted === 'live') === live(s));
    const columns = [
      ['Sandbox', (s) => h('a', { href: `#/sandboxes/${encodeURIComponent(s.id)}`, testid: 'sandbox-link' }, s.id)],
      ...(me.role === 'admin' ? [['Tenant', (s) => s.tenant]] : []),
      ['State', (s) => badge(s.status)],
      ['Lane', laneOf],
      ['Node', (s) => s.node || 'this server'],
      ['Template', (s) => s.template || '—'],
      ['Age', (s) => age(s.created_ms, s.finished_ms || Date.now())],
      ['CPU s', (s) => num(used.get(s.id)?.cpu_seconds), 'num'],
      ['Memory', (s) => bytes(used.get(s.id)?.memory_bytes), 'num'],
      ['Labels', (s) => Object.entries(s.labels || {}).map(([k, v]) => `${k}=${v}`).join(' ')],
    ];
    fill(body, table(columns, shown,
      (s) => ({ testid: 'sandbox-row', 'data-id': s.id, 'data-status': s.status }),
      wanted === 'live' ? 'No live sandboxes.' : 'No sandboxes.'));
    fill(status, `updated ${new Date().toLocaleTimeString()}`);
  };
  filter.addEventListener('change', () => refresh().catch((err) => fill(body, errorText(err))));
  every(POLL_MS, signal, refresh, (err) => fill(body, errorText(err)));
}
