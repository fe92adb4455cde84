// Nodes (with a capacity heatmap), the queue, templates with their warm pools, and policies with history.

import { api, every } from './api.js';
import { age, bar, bytes, errorText, fill, h, table, when } from './dom.js';

const POLL_MS = 2000;

const fraction = (used, total) => (total > 0 ? used / total : 0);

function heat(f) {
  const level = f <= 0 ? 0 : Math.min(4, 1 + Math.floor(f * 4 - 1e-9));
  return h('span', { class: `heat l${level}`, title: `${Math.round(f * 100)}%` });
}

export function nodes(main, { signal }) {
  const body = h('div', { testid: 'nodes' });
  fill(main, h('h1', {}, 'Nodes'), body);
  every(POLL_MS, signal, async () => {
    const list = await api('/v1/nodes', { signal });
    const cpu = (n) => fraction(n.usage.cpu_millis, n.capacity.cpu_millis);
    const mem = (n) => fraction(n.usage.memory_bytes, n.capacity.memory_bytes);
    fill(body,
      list.length ? h('p', { testid: 'heatmap' }, 'Capacity in use (CPU, memory): ',
        list.map((n) => h('span', { title: n.id }, heat(cpu(n)), heat(mem(n))))) : null,
      table([
        ['Node', (n) => n.id], ['State', (n) => n.state], ['Address', (n) => n.address],
        ['Lanes', (n) => (n.lanes || []).map((l) => l.name || l.lane || JSON.stringify(l)).join(', ') || 'process'],
        ['CPU', (n) => [bar(cpu(n)), ` ${n.usage.cpu_millis / 1000} / ${n.capacity.cpu_millis / 1000}`]],
        ['Memory', (n) => [bar(mem(n)), ` ${bytes(n.usage.memory_bytes)} / ${bytes(n.capacity.memory_bytes)}`]],
        ['Labels', (n) => Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(' ')],
        ['Last heartbeat', (n) => `${age(n.last_heartbeat_ms)} ago`],
      ], list, () => ({ testid: 'node-row' }), 'No cluster nodes: sandboxes run on this server.'));
  }, (err) => fill(body, errorText(err)));
}

export function queue(main, { signal }) {
  const body = h('div', { testid: 'queue' });
  fill(main, h('h1', {}, 'Queue'), body);
  const columns = [
    ['Request', (q) => q.id], ['Tenant', (q) => q.tenant], ['Lane', (q) => q.lane], ['Priority', (q) => q.priority],
    ['State', (q) => q.state], ['Attempts', (q) => `${q.attempts}/${q.max_attempts}`],
    ['Waiting since', (q) => when(q.enqueued_ms)], ['Why', (q) => q.last_error || q.reason || '—'],
  ];
  every(POLL_MS, signal, async () => {
    const q = await api('/v1/queue', { signal });
    fill(body,
      h('p', { testid: 'depth' }, 'Depth: ', Object.entries(q.depth).map(([lane, n]) => `${lane} ${n}`).join(' · ')),
      h('h2', {}, 'Waiting'), table(columns, q.waiting, () => ({ testid: 'queue-row' }), 'Nothing waits.'),
      h('h2', {}, 'Dead letters'), table(columns, q.dead_letters, () => ({ testid: 'dead-row' }), 'No dead letters.'));
  }, (err) => fill(body, errorText(err)));
}

export function templates(main, { signal }) {
  const body = h('div', { testid: 'templates' });
  fill(main, h('h1', {}, 'Templates and warm pools'), body);
  every(POLL_MS, signal, async () => {
    const list = await api('/v1/templates', { signal });
    fill(body, table([
      ['Template', (t) => t.id], ['Owner', (t) => t.tenant || 'shared'],
      ['Image', (t) => t.template.base_image || '—'],
      ['Pool size', (t) => (t.template.pool ? t.template.pool.size : 0), 'num'],
      ['Warm now', (t) => t.warm, 'num'], ['Updated', (t) => when(t.updated_ms)],
    ], list, () => ({ testid: 'template-row' }), 'No templates.'));
  }, (err) => fill(body, errorText(err)));
}

export function policies(main, { signal }) {
  const body = h('div', { testid: 'policies' });
  const history = h('div', { testid: 'policy-history' });
  fill(main, h('h1', {}, 'Policies'), body, history);
  const showHistory = async (id) => {
    try {
      const revisions = await api(`/v1/policies/${encodeURIComponent(id)}/history`, { signal });
      fill(history, h('h2', {}, `History of ${id}`), table([
        ['Revision', (r) => r.revision], ['When', (r) => when(r.created_ms)], ['Author', (r) => r.author],
        ['Rollback of', (r) => r.rollback_of ?? '—'],
        ['Policy', (r) => h('pre', {}, r.policy === null ? '(removed)' : JSON.stringify(r.policy, null, 2))],
      ], revisions));
    } catch (err) { fill(history, errorText(err)); }
  };
  every(POLL_MS * 5, signal, async () => {
    const list = await api('/v1/policies', { signal });
    fill(body, table([
      ['Policy', (p) => p.id], ['Revision', (p) => p.revision], ['Applied', (p) => when(p.created_ms)],
      ['Author', (p) => p.author],
      ['', (p) => h('button', { type: 'button', onclick: () => showHistory(p.id) }, 'History')],
    ], list, () => ({ testid: 'policy-row' }), 'No policies: defaults apply.'));
  }, (err) => fill(body, errorText(err)));
}
