// Building the page from data. Every string becomes a text node or an attribute value, never markup:
// nothing here parses HTML, so text from the API cannot become elements or scripts.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'class') el.className = value;
    else if (name === 'testid') el.dataset.testid = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces everything inside `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

/** A table: `columns` are [title, row => cell content, class?]; `rowProps(row)` gives each row's props. */
export function table(columns, rows, rowProps = () => ({}), empty = 'Nothing here.') {
  if (rows.length === 0) return h('p', { class: 'muted', testid: 'empty' }, empty);
  return h('table', {},
    h('thead', {}, h('tr', {}, columns.map(([title]) => h('th', {}, title)))),
    h('tbody', {}, rows.map((row) => h('tr', rowProps(row),
      columns.map(([, cell, cls]) => h('td', { class: cls }, cell(row)))))));
}

export function badge(text) {
  return h('span', { class: `badge ${String(text).replace(/[^a-z_-]/g, '')}`, testid: 'badge' }, text);
}

export function age(fromMs, toMs = Date.now()) {
  const s = Math.max(0, Math.round((toMs - fromMs) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function when(ms) {
  return ms === null || ms === undefined ? '—' : new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n; let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v < 10 && i > 0 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function num(x, digits = 2) {
  return x === null || x === undefined ? '—' : Number(x).toFixed(digits);
}

/** A bar for a fraction between 0 and 1 (classes only: the CSP allows no inline styles). */
export function bar(fraction) {
  const pct = Math.min(100, Math.max(0, Math.round((fraction || 0) * 10) * 10));
  return h('span', { class: 'bar', title: `${Math.round((fraction || 0) * 100)}%` }, h('span', { class: `pct${pct}` }));
}

export function errorText(err) {
  return h('p', { class: 'error', testid: 'error' }, err && err.message ? err.message : String(err));
}
