// The REST API from the browser, with the key kept in this tab's sessionStorage.

const KEY = 'tartarus.key';

export const session = {
  key: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key()}`, ...extra };
}

async function failure(response) {
  const text = await response.text();
  let error = {};
  try { error = JSON.parse(text).error || {}; } catch { /* not JSON */ }
  if (response.status === 401) window.dispatchEvent(new CustomEvent('tartarus:unauthorized'));
  return new ApiError(response.status, error.code || `http_${response.status}`,
    `${response.status}: ${error.message || text || response.statusText}`);
}

/** Calls the API; the parsed JSON answer, or an ApiError with the server's message. */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: 'no-store',
  });
  if (!response.ok) throw await failure(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** Streams a text answer (a followed log) to `onText` as it arrives; resolves when the server ends it. */
export async function follow(path, onText, signal) {
  const response = await fetch(path, { headers: headers(), signal, cache: 'no-store' });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}

/** Runs `task` now and then every `ms` until `signal` aborts; errors go to `onError`. */
export function every(ms, signal, task, onError = () => {}) {
  let timer = null;
  const tick = async () => {
    if (signal.aborted) return;
    try { await task(); } catch (err) { if (!signal.aborted && err.name !== 'AbortError') onError(err); }
    if (!signal.aborted) timer = setTimeout(tick, ms);
  };
  signal.addEventListener('abort', () => clearTimeout(timer));
  tick();
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}
