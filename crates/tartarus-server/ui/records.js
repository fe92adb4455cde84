// The event stream and the audit trail with filters, and usage (with cost) per tenant and sandbox.

import { api, every, query } from './api.js';
import { bytes, errorText, fill, h, num, table, when } from './dom.js';

const POLL_MS = 3000;

const sinceMs = (select) => (select.value ? Date.now() - Number(select.value) * 1000 : undefined);

function sinceSelect(testid) {
  return h('select', { testid },
    h('option', { value: '' }, 'any time'), h('option', { value: '900' }, 'last 15 min'),
    h('option', { value: '3600' }, 'last hour'), h('option', { value: '86400' }, 'last day'));
}

function tenantInput(me) {
  return me.role === 'admin' ? h('input', { placeholder: 'tenant (all)', testid: 'tenant-filter' }) : null;
}

function live(controls, signal, refresh, body) {
  for (const c of controls) if (c) c.addEventListener('change', () => refresh().catch((err) => fill(body, errorText(err))));
  every(POLL_MS, signal, refresh, (err) => fill(body, errorText(err)));
}

export function events(main, { me, signal }) {
  const category = h('select', { testid: 'category-filter' }, ['', 'enforcement', 'admission', 'lifecycle', 'dead_letter']
    .map((c) => h('option', { value: c }, c || 'every category')));
  const sandbox = h('input', { placeholder: 'sandbox id', testid: 'sandbox-filter' });
  const since = sinceSelect('since-filter');
  const tenant = tenantInput(me);
  const body = h('div', { testid: 'events' });
  fill(main, h('h1', {}, 'Events'), h('div', { class: 'toolbar' }, category, sandbox, tenant, since), body);
  const refresh = async () => {
    const list = await api(`/v1/events${query({
      category: category.value, sandbox: sandbox.value.trim(), tenant: tenant?.value.trim(), since_ms: sinceMs(since), limit: 500,
    })}`, { signal });
    fill(body, table([
      ['When', (e) => when(e.at_ms)], ['Tenant', (e) => e.tenant || '—'], ['Category', (e) => e.category],
      ['Kind', (e) => e.kind],
      ['Sandbox', (e) => (e.sandbox ? h('a', { href: `#/sandboxes/${encodeURIComponent(e.sandbox)}` }, e.sandbox) : '—')],
      ['Message', (e) => e.message],
    ], list, () => ({ testid: 'event-row' }), 'No events.'));
  };
  live([category, sandbox, tenant, since], signal, refresh, body);
}

export function audit(main, { me, signal }) {
  const action = h('input', { placeholder: 'action (e.g. sandbox.delete)', testid: 'action-filter' });
  const target = h('input', { placeholder: 'target id', testid: 'target-filter' });
  const since = sinceSelect('since-filter');
  const tenant = tenantInput(me);
  const body = h('div', { testid: 'audit' });
  fill(main, h('h1', {}, 'Audit trail'), h('div', { class: 'toolbar' }, action, target, tenant, since), body);
  const refresh = async () => {
    const list = await api(`/v1/audit${query({ tenant: tenant?.value.trim(), since_ms: sinceMs(since) })}`, { signal });
    const a = action.value.trim();
    const t = target.value.trim();
    const shown = list.filter((r) => (!a || r.action.includes(a)) && (!t || r.target === t)).slice(0, 500);
    fill(body, table([
      ['When', (r) => when(r.at_ms)], ['Tenant', (r) => r.tenant], ['Key', (r) => r.key_id || '—'],
      ['Action', (r) => r.action], ['Target', (r) => r.target || '—'], ['Outcome', (r) => r.outcome],
    ], shown, () => ({ testid: 'audit-row' }), 'No audit records.'));
  };
  live([action, target, tenant, since], signal, refresh, body);
}

export function usage(main, { me, signal }) {
  const since = sinceSelect('since-filter');
  const tenant = tenantInput(me);
  const body = h('div', { testid: 'usage' });
  fill(main, h('h1', {}, 'Usage and cost'), h('div', { class: 'toolbar' }, tenant, since), body);
  const cost = (c) => (c ? `${num(c.total, 6)} ${c.currency}` : '—');
  const refresh = async () => {
    const report = await api(`/v1/usage${query({ tenant: tenant?.value.trim(), since: sinceMs(since), limit: 500 })}`, { signal });
    fill(body,
      table([
        ['Tenant', (t) => t.tenant], ['Sandboxes', (t) => t.sandboxes, 'num'],
        ['CPU s', (t) => num(t.cpu_seconds, 3), 'num'], ['Memory GiB·s', (t) => num(t.memory_gib_seconds, 4), 'num'],
        ['Egress', (t) => bytes(t.egress_bytes), 'num'], ['Tool calls', (t) => t.tool_calls, 'num'],
        ['Cost', (t) => cost(t.cost), 'num'],
      ], report.tenants, () => ({ testid: 'tenant-usage-row' }), 'No usage.'),
      h('h2', {}, 'Per sandbox'),
      table([
        ['Sandbox', (u) => h('a', { href: `#/sandboxes/${encodeURIComponent(u.sandbox)}` }, u.sandbox)],
        ['Tenant', (u) => u.tenant], ['Live', (u) => (u.live ? 'yes' : 'no')],
        ['CPU s', (u) => num(u.cpu_seconds, 3), 'num'], ['Memory GiB·s', (u) => num(u.memory_gib_seconds, 4), 'num'],
        ['Tool calls', (u) => u.tool_calls, 'num'], ['Cost', (u) => cost(u.cost), 'num'],
      ], report.sandboxes, () => ({ testid: 'sandbox-usage-row' }), 'No sandboxes.'));
  };
  live([tenant, since], signal, refresh, body);
}
