// The dashboard's shell: sign-in with an API key, the navigation, and one view per hash route.

import { api, session } from './api.js';
import { fill, h } from './dom.js';
import * as sandboxes from './sandboxes.js';
import * as sandbox from './sandbox.js';
import * as cluster from './cluster.js';
import * as records from './records.js';

const routes = [
  [/^#\/sandboxes$/, sandboxes.list],
  [/^#\/sandboxes\/([^/]+)$/, sandbox.page],
  [/^#\/nodes$/, cluster.nodes],
  [/^#\/queue$/, cluster.queue],
  [/^#\/templates$/, cluster.templates],
  [/^#\/policies$/, cluster.policies],
  [/^#\/events$/, records.events],
  [/^#\/audit$/, records.audit],
  [/^#\/usage$/, records.usage],
];

let stopView = null;
let me = null;

function signOut() {
  session.clear();
  me = null;
  location.hash = '#/login';
  route();
}

function showLogin(main, message) {
  document.getElementById('nav').hidden = true;
  fill(document.getElementById('who'));
  const input = h('input', {
    type: 'password', id: 'api-key', name: 'api-key', autocomplete: 'off', testid: 'api-key',
    placeholder: 'tk_…', required: true,
  });
  const form = h('form', {
    class: 'login', testid: 'login',
    onsubmit: async (event) => {
      event.preventDefault();
      session.set(input.value.trim());
      me = null;
      if (!location.hash || location.hash === '#/login') location.hash = '#/sandboxes';
      else route();
    },
  },
  h('h1', {}, 'Sign in'),
  h('label', { for: 'api-key' }, 'API key'),
  input,
  h('button', { type: 'submit', testid: 'sign-in' }, 'Sign in'),
  h('p', { class: 'muted' }, 'The key stays in this tab (sessionStorage) and goes only to this server.'),
  message ? h('p', { class: 'error', testid: 'login-error' }, message) : null);
  fill(main, form);
  input.focus();
}

async function route() {
  if (stopView) { stopView(); stopView = null; }
  const main = document.getElementById('main');
  if (!session.key()) return showLogin(main);
  if (!me) {
    try {
      me = await api('/v1/whoami');
    } catch (err) {
      session.clear();
      return showLogin(main, err.status === 401 ? 'That key was refused (unknown or revoked).' : err.message);
    }
  }
  document.getElementById('nav').hidden = false;
  fill(document.getElementById('who'),
    h('span', { testid: 'whoami' }, `${me.tenant} · ${me.role}`),
    h('button', { type: 'button', testid: 'sign-out', onclick: signOut }, 'Sign out'));
  const hash = !location.hash || location.hash === '#/login' ? '#/sandboxes' : location.hash;
  for (const [pattern, view] of routes) {
    const match = hash.match(pattern);
    if (!match) continue;
    const control = new AbortController();
    stopView = () => control.abort();
    fill(main);
    view(main, { me, signal: control.signal, params: match.slice(1).map(decodeURIComponent) });
    return;
  }
  fill(main, h('p', { class: 'error' }, `No page ${hash}.`));
}

window.addEventListener('hashchange', route);
window.addEventListener('tartarus:unauthorized', () => { session.clear(); me = null; route(); });
route();
