// The fmhost console: a small client of the server's own /v1 API. No framework, no
// build step; the session is an HttpOnly cookie and every change carries the session's
// CSRF token from the page's <meta>.
'use strict';

const CSRF = document.querySelector('meta[name="fmhost-csrf"]').content;
const SCOPE = document.querySelector('meta[name="fmhost-scope"]').content;
const ADMIN = SCOPE === 'admin';
const main = document.getElementById('main');

// ---- DOM helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  return fill(el, attrs, children);
}

const SVG = 'http://www.w3.org/2000/svg';
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  return fill(el, attrs, children);
}

function fill(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(status) {
  return h('span', { class: `badge ${status}`, 'data-status': status, text: status });
}

function ms(v) {
  if (v === undefined || v === null) return '';
  return v >= 10000 ? `${(v / 1000).toFixed(1)} s` : `${v} ms`;
}

function runLink(id) {
  return h('a', { href: `#/runs/${encodeURIComponent(id)}`, class: 'mono', text: id });
}

function jsonBlock(v) {
  return h('pre', { text: JSON.stringify(v, null, 2) });
}

// ---- the API -----------------------------------------------------------------------

async function api(method, path, body, contentType) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = CSRF;
  if (contentType) headers['Content-Type'] = contentType;
  const r = await fetch(path, { method, headers, body, credentials: 'same-origin' });
  const text = await r.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (r.status === 401) { location.href = '/'; }
  return { ok: r.ok, status: r.status, data };
}

function problem(res) {
  const d = res.data;
  if (d && typeof d === 'object' && d.detail) return `${d.title}: ${d.detail}`;
  if (d && typeof d === 'object' && d.error) return d.error;
  return `HTTP ${res.status}`;
}

const flashBox = document.getElementById('flash');
function flash(kind, text) {
  flashBox.hidden = false;
  flashBox.className = kind;
  flashBox.textContent = text;
}
function clearFlash() { flashBox.hidden = true; flashBox.textContent = ''; }

// Runs an admin action from a button: disabled while it runs, its outcome flashed.
async function act(button, label, call, after) {
  button.disabled = true;
  flash('', `${label}…`);
  try {
    const res = await call();
    if (res.ok || (res.data && res.data.run_id)) {
      const status = res.data && (res.data.status || (res.data.run && res.data.run.status));
      flash(status && status !== 'succeeded' ? 'bad' : 'good',
        `${label}: ${status ? status : 'done'}${res.ok ? '' : ` (${problem(res)})`}`);
    } else {
      flash('bad', `${label} refused: ${problem(res)}`);
    }
    if (after) await after(res);
  } catch (e) {
    flash('bad', `${label} failed: ${e}`);
  } finally {
    button.disabled = false;
  }
}

function adminButton(label, attrs, onclick) {
  return h('button', Object.assign({
    type: 'button', disabled: !ADMIN,
    title: ADMIN ? undefined : 'needs an admin session',
    onclick,
  }, attrs), label);
}

// ---- routing and live updates --------------------------------------------------------

let page = null; // { onEvent(ev) }

function params(query) {
  return Object.fromEntries(new URLSearchParams(query || ''));
}

async function route() {
  const hash = location.hash || '#/runs';
  const [path, query] = hash.slice(1).split('?');
  const parts = path.split('/').filter(Boolean);
  document.querySelectorAll('header nav a').forEach(a =>
    a.classList.toggle('active', a.dataset.nav === (parts[0] || 'runs')));
  page = null;
  try {
    if (parts[0] === 'runs' && parts[1]) await runPage(decodeURIComponent(parts[1]));
    else if (parts[0] === 'plugins') await pluginsPage();
    else if (parts[0] === 'dlq') await dlqPage(params(query));
    else if (parts[0] === 'services') await servicesPage();
    else if (parts[0] === 'triggers') await triggersPage();
    else await runsPage(params(query));
  } catch (e) {
    main.replaceChildren(h('p', { class: 'error', text: `Could not load this page: ${e}` }));
  }
}

window.addEventListener('hashchange', () => { clearFlash(); route(); });

function debounce(fn, wait) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), wait); };
}

const events = new EventSource('/v1/events');
const live = document.getElementById('live');
events.onopen = () => live.classList.add('on');
events.onerror = () => live.classList.remove('on');
events.onmessage = e => {
  let ev;
  try { ev = JSON.parse(e.data); } catch (_) { return; }
  if (page && page.onEvent) page.onEvent(ev);
};

// ---- runs --------------------------------------------------------------------------

const STATUSES = ['succeeded', 'failed', 'running', 'timed-out', 'cancelled'];
const SINCE = [['', 'any time'], ['1h', 'last hour'], ['24h', 'last 24 hours'], ['7d', 'last 7 days']];

async function runsPage(q) {
  const pipelines = (await api('GET', '/v1/pipelines')).data || [];
  const select = (name, options, value) => h('select', {
    name, id: `filter-${name}`,
    onchange: () => {
      const f = new URLSearchParams();
      for (const el of main.querySelectorAll('.filters select')) if (el.value) f.set(el.name, el.value);
      location.hash = `#/runs?${f}`;
    },
  }, options.map(([v, label]) => h('option', { value: v, selected: v === (value || ''), text: label })));
  const body = h('tbody');
  const table = h('table', { id: 'runs' },
    h('thead', {}, h('tr', {}, ['Run', 'Pipeline', 'Status', 'Trigger', 'Started', 'Duration', 'Error']
      .map(t => h('th', { text: t, class: t === 'Duration' ? 'num' : undefined })))),
    body);
  main.replaceChildren(
    h('h1', { text: 'Runs' }),
    h('div', { class: 'filters' },
      h('label', {}, 'Pipeline', select('pipeline', [['', 'all']].concat(pipelines.map(p => [p.name, p.name])), q.pipeline)),
      h('label', {}, 'Status', select('status', [['', 'all']].concat(STATUSES.map(x => [x, x])), q.status)),
      h('label', {}, 'Started', select('since', SINCE, q.since))),
    table);
  const load = async () => {
    const f = new URLSearchParams({ limit: '200' });
    for (const k of ['pipeline', 'status', 'since']) if (q[k]) f.set(k, q[k]);
    const res = await api('GET', `/v1/runs?${f}`);
    if (!res.ok) { flash('bad', problem(res)); return; }
    body.replaceChildren(...res.data.map(r => h('tr', { 'data-run': r.run_id, 'data-status': r.status, class: r.status },
      h('td', {}, runLink(r.run_id)),
      h('td', { text: r.pipeline }),
      h('td', {}, badge(r.status)),
      h('td', { text: r.trigger }),
      h('td', { text: r.started_at }),
      h('td', { class: 'num', text: ms(r.duration_ms) }),
      h('td', { text: r.error ? `${r.error_kind ? `[${r.error_kind}] ` : ''}${r.error}` : '' }))));
    if (!res.data.length) body.append(h('tr', {}, h('td', { colspan: 7, class: 'muted', text: 'No runs match.' })));
  };
  await load();
  page = { onEvent: debounce(ev => { if (ev.type === 'run') load(); }, 250) };
}

// The worst status among a stage's reports (a loop body's stage runs as ID[i]).
function stageStatus(stages, id) {
  const rank = ['failed', 'running', 'succeeded', 'skipped', 'pending'];
  let best = null;
  for (const st of stages) {
    if (st.id === id || st.id.startsWith(`${id}[`)) {
      if (best === null || rank.indexOf(st.status) < rank.indexOf(best)) best = st.status;
    }
  }
  return best || 'pending';
}

async function runPage(id) {
  const res = await api('GET', `/v1/runs/${encodeURIComponent(id)}`);
  if (!res.ok) { main.replaceChildren(h('h1', { text: `Run ${id}` }), h('p', { class: 'error', text: problem(res) })); return; }
  const run = res.data;
  const failed = run.stages.filter(st => st.status === 'failed');
  const graph = await api('GET', `/v1/pipelines/${encodeURIComponent(run.pipeline)}/graph`);

  const actions = h('div', { class: 'actions' },
    adminButton('Replay', { id: 'replay' }, e => act(e.target, 'Replay', () =>
      api('POST', `/v1/runs/${encodeURIComponent(id)}/replay`), openRun)),
    failed.length ? adminButton(`Retry from ${failed[0].id}`, { id: 'retry-stage' }, e => act(e.target, `Retry from ${failed[0].id}`, () =>
      api('POST', `/v1/runs/${encodeURIComponent(id)}/replay?from=${encodeURIComponent(failed[0].id.replace(/\[.*$/, ''))}`), openRun)) : null,
    run.dead_letter ? adminButton(`Retry dead letter ${run.dead_letter}`, { id: 'retry-dlq' }, e => act(e.target, 'Retry dead letter', () =>
      api('POST', `/v1/dlq/${run.dead_letter}/retry`), r => openRun({ ok: true, data: r.data && r.data.run }))) : null);

  const facts = h('dl', { class: 'facts' },
    h('dt', { text: 'Pipeline' }), h('dd', {}, h('a', { href: `#/runs?pipeline=${encodeURIComponent(run.pipeline)}`, text: run.pipeline })),
    h('dt', { text: 'Trigger' }), h('dd', { text: run.trigger }),
    h('dt', { text: 'Started' }), h('dd', { text: `${run.started_at}${run.duration_ms !== null ? `, took ${ms(run.duration_ms)}` : ''}` }),
    h('dt', { text: 'Trace' }), h('dd', { class: 'mono', id: 'trace-id', text: run.trace_id || '' }),
    run.replay_of ? [h('dt', { text: 'Replay of' }), h('dd', {}, runLink(run.replay_of))] : null,
    run.replayed_by && run.replayed_by.length ? [h('dt', { text: 'Replayed by' }), h('dd', {}, run.replayed_by.map(r => [runLink(r), ' ']))] : null,
    run.dead_letter ? [h('dt', { text: 'Dead letter' }), h('dd', {}, h('a', { href: '#/dlq', text: `#${run.dead_letter} (open)` }))] : null);

  main.replaceChildren(
    h('h1', {}, `Run `, h('span', { class: 'mono', text: run.run_id }), ' ', badge(run.status)),
    facts,
    run.error ? h('div', { class: 'error-box', id: 'run-error' },
      h('b', { text: failed.length ? `Stage ${failed.map(f => f.id).join(', ')} failed: ` : 'Failed: ' }),
      `${run.error_kind ? `[${run.error_kind}] ` : ''}${run.error}`) : null,
    actions,
    h('h2', { text: 'Pipeline' }),
    graph.ok ? dagSvg(graph.data, run.stages) : h('p', { class: 'muted', text: `No graph: ${problem(graph)}` }),
    h('h2', { text: 'Timeline' }),
    timelineSvg(run),
    h('h2', { text: 'Stages' }),
    stagesTable(run),
    h('h2', { text: 'Attempts' }),
    attemptsTable(run),
    h('h2', { text: 'Input' }), jsonBlock(run.input),
    h('h2', { text: 'Output' }), jsonBlock(run.output));
  page = { onEvent: debounce(ev => { if (ev.type === 'run' && ev.run_id === id) runPage(id); }, 250) };
}

function openRun(res) {
  const runId = res && res.data && (res.data.run_id || (res.data.run && res.data.run.run_id));
  if (runId) location.hash = `#/runs/${encodeURIComponent(runId)}`;
}

function stagesTable(run) {
  return h('table', { id: 'stages' },
    h('thead', {}, h('tr', {}, ['Stage', 'Status', 'Component', 'Attempts', 'Start', 'Duration', 'Error / output']
      .map(t => h('th', { text: t })))),
    h('tbody', {}, run.stages.map(st => h('tr', { 'data-stage': st.id, 'data-status': st.status, class: st.status },
      h('td', { class: 'mono', text: st.id }),
      h('td', {}, badge(st.status)),
      h('td', { text: `${st.component}${st.version ? ` ${st.version}` : ''}` }),
      h('td', { class: 'num', text: st.attempts }),
      h('td', { class: 'num', text: ms(st.started_ms) }),
      h('td', { class: 'num', text: ms(st.duration_ms) }),
      h('td', {},
        st.error ? h('div', { class: 'error stage-error', text: `[${st.error.kind}] ${st.error.message}` }) : null,
        st.skipped_because ? h('span', { class: 'muted', text: `skipped: ${st.skipped_because}` }) : null,
        st.reused_from ? h('span', { class: 'muted', text: `reused from ${st.reused_from}` }) : null,
        st.output !== undefined && st.output !== null ? h('details', {}, h('summary', { text: 'output' }), jsonBlock(st.output)) : null)))));
}

function attemptsTable(run) {
  const rows = [];
  for (const st of run.stages) for (const a of st.calls || []) rows.push([st.id, a]);
  if (!rows.length) return h('p', { class: 'muted', text: 'No outbound calls.' });
  return h('table', { id: 'attempts' },
    h('thead', {}, h('tr', {}, ['Stage', '#', 'Service', 'Request', 'Outcome', 'Duration', 'Idempotency key']
      .map(t => h('th', { text: t })))),
    h('tbody', {}, rows.map(([stage, a]) => h('tr', { class: a.error_kind || (a.status >= 400) ? 'failed' : '' },
      h('td', { class: 'mono', text: stage }),
      h('td', { class: 'num', text: a.attempt }),
      h('td', { text: a.service }),
      h('td', { class: 'mono', text: `${a.method} ${a.url}` }),
      h('td', { text: [a.status, a.error_kind].filter(x => x !== undefined && x !== null).join(' ') }),
      h('td', { class: 'num', text: ms(a.duration_ms) }),
      h('td', { class: 'mono', text: a.idempotency_key || '' })))));
}

// ---- pictures ----------------------------------------------------------------------

// A layered drawing: each stage one column right of everything it depends on.
function dagSvg(graph, stages) {
  const nodes = graph.nodes;
  const index = new Map(nodes.map((n, i) => [n.id, i]));
  const preds = nodes.map(() => []);
  for (const e of graph.edges) if (index.has(e.from) && index.has(e.to)) preds[index.get(e.to)].push(index.get(e.from));
  nodes.forEach((n, i) => {
    if (n.block !== undefined) {
      const c = index.get(graph.blocks[n.block].controller);
      if (c !== undefined) preds[i].push(c);
    }
  });
  const layer = new Array(nodes.length).fill(-1);
  const depth = (i, seen) => {
    if (layer[i] >= 0) return layer[i];
    if (seen.has(i)) return 0;
    seen.add(i);
    layer[i] = preds[i].reduce((m, p) => Math.max(m, depth(p, seen) + 1), 0);
    return layer[i];
  };
  nodes.forEach((_, i) => depth(i, new Set()));
  const W = 170, H = 44, GX = 50, GY = 22, PAD = 16;
  const rows = [];
  const pos = nodes.map((n, i) => {
    const col = layer[i];
    rows[col] = (rows[col] || 0) + 1;
    return { x: PAD + col * (W + GX), y: PAD + (rows[col] - 1) * (H + GY) };
  });
  const width = PAD * 2 + (Math.max(0, ...layer) + 1) * (W + GX) - GX;
  const height = PAD * 2 + Math.max(1, ...rows.filter(Boolean)) * (H + GY) - GY + 14;
  const svg = s('svg', { id: 'dag', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `DAG of ${graph.pipeline}` });
  // Blocks first, behind their stages.
  graph.blocks.forEach((b, bi) => {
    const members = nodes.map((n, i) => [n, i]).filter(([n]) => n.block === bi).map(([, i]) => pos[i]);
    if (!members.length) return;
    const x0 = Math.min(...members.map(p => p.x)) - 8, y0 = Math.min(...members.map(p => p.y)) - 18;
    const x1 = Math.max(...members.map(p => p.x)) + W + 8, y1 = Math.max(...members.map(p => p.y)) + H + 8;
    svg.append(s('rect', { class: 'block', x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 8 }),
      s('text', { class: 'small', x: x0 + 6, y: y0 + 12, text: `${b.controller}: ${b.field}${b.per_item ? ' (per item)' : ''}` }));
  });
  const edge = (from, to, cls, label) => {
    const a = pos[from], b = pos[to];
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    const mx = (x1 + x2) / 2;
    svg.append(s('path', { class: `edge ${cls}`, d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 4},${y2}`, 'marker-end': 'url(#arrow)' }));
    if (label) svg.append(s('text', { class: 'small', x: mx - 20, y: (y1 + y2) / 2 - 3, text: label }));
  };
  svg.append(s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 8, refY: 5, markerWidth: 6, markerHeight: 6, orient: 'auto-start-reverse' },
    s('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: '#8c959f' }))));
  for (const e of graph.edges) {
    if (!index.has(e.from) || !index.has(e.to)) continue;
    edge(index.get(e.from), index.get(e.to), e.kind === 'depends' ? '' : 'branch', e.kind === 'depends' ? '' : e.kind);
  }
  nodes.forEach((n, i) => {
    const status = stageStatus(stages, n.id);
    const p = pos[i];
    const title = s('title', { text: `${n.id} (${n.component}): ${status}` });
    svg.append(s('g', { class: `node ${status}${n.control ? ' control' : ''}`, 'data-stage': n.id, 'data-status': status, transform: `translate(${p.x},${p.y})` },
      title,
      s('rect', { width: W, height: H, rx: n.control ? 14 : 6 }),
      s('text', { x: 10, y: 18, text: n.id.length > 24 ? `${n.id.slice(0, 23)}…` : n.id }),
      s('text', { class: 'small', x: 10, y: 34, text: `${n.component} · ${status}` })));
  });
  return svg;
}

// The seed's Gantt chart: a bar per stage, and under it a thin bar per outbound attempt.
function timelineSvg(run) {
  const t0 = Date.parse(run.started_at) || 0;
  const startMs = run.started_at_ms || t0;
  const rows = [];
  for (const st of run.stages) {
    if (st.started_ms === undefined || st.started_ms === null) continue;
    rows.push({ label: st.id, cls: `bar ${st.status}`, start: st.started_ms, end: st.started_ms + (st.duration_ms || 0), stage: st.id, status: st.status });
    for (const a of st.calls || []) {
      const end = a.at_ms - startMs;
      const bad = a.error_kind || a.status >= 400;
      rows.push({ label: `  ${a.method} #${a.attempt} ${a.status || a.error_kind || ''}`, cls: `attempt${bad ? ' bad' : ''}`, start: Math.max(0, end - a.duration_ms), end: Math.max(0, end), thin: true });
    }
  }
  if (!rows.length) return h('p', { class: 'muted', text: 'No stage ran.' });
  const total = Math.max(1, run.duration_ms || 0, ...rows.map(r => r.end));
  const LABEL = 220, W = 720, RH = 20, PAD = 10;
  const height = PAD * 2 + rows.length * RH + 20;
  const svg = s('svg', { id: 'timeline', width: LABEL + W + PAD * 2, height, role: 'img', 'aria-label': 'timeline' });
  const x = v => LABEL + PAD + (v / total) * W;
  for (let i = 0; i <= 4; i++) {
    const v = (total * i) / 4;
    svg.append(s('line', { class: 'grid', x1: x(v), x2: x(v), y1: PAD, y2: height - 20 }),
      s('text', { class: 'small', x: x(v) - 10, y: height - 6, text: ms(Math.round(v)) }));
  }
  rows.forEach((r, i) => {
    const y = PAD + i * RH;
    svg.append(s('text', { class: r.thin ? 'small' : '', x: PAD, y: y + 14, text: r.label.length > 34 ? `${r.label.slice(0, 33)}…` : r.label }));
    const bar = s('rect', { class: r.cls, x: x(r.start), y: y + (r.thin ? 7 : 3), width: Math.max(2, x(r.end) - x(r.start)), height: r.thin ? 7 : 14, rx: 2 },
      s('title', { text: `${r.label.trim()}: ${ms(r.start)} → ${ms(r.end)}` }));
    if (r.stage) { bar.setAttribute('data-stage', r.stage); bar.setAttribute('data-status', r.status); }
    svg.append(bar);
  });
  return svg;
}

// ---- dead letters ------------------------------------------------------------------

async function dlqPage(q) {
  const status = q.status || 'open';
  const body = h('tbody');
  const select = h('select', { id: 'filter-dlq-status', onchange: e => { location.hash = `#/dlq?status=${e.target.value}`; } },
    ['open', 'resolved', 'dropped', 'all'].map(v => h('option', { value: v, selected: v === status, text: v })));
  main.replaceChildren(h('h1', { text: 'Dead letters' }),
    h('div', { class: 'filters' }, h('label', {}, 'Status', select)),
    h('table', { id: 'dlq' },
      h('thead', {}, h('tr', {}, ['#', 'Status', 'Pipeline', 'Run', 'Reason', 'Retries', 'Created', ''].map(t => h('th', { text: t })))),
      body));
  const load = async () => {
    const res = await api('GET', `/v1/dlq?status=${encodeURIComponent(status)}`);
    if (!res.ok) { flash('bad', problem(res)); return; }
    body.replaceChildren(...res.data.map(d => h('tr', { 'data-dlq': d.id, 'data-status': d.status },
      h('td', { class: 'num', text: d.id }),
      h('td', {}, badge(d.status)),
      h('td', { text: d.pipeline }),
      h('td', {}, runLink(d.run_id)),
      h('td', { text: `${d.error_kind ? `[${d.error_kind}] ` : ''}${d.reason}` }),
      h('td', { class: 'num', text: d.retries }),
      h('td', { text: d.created_at }),
      h('td', {}, d.status === 'open' ? h('span', { class: 'actions' },
        adminButton('Retry', { class: 'primary', 'data-action': 'retry' }, e => act(e.target, `Retry of dead letter ${d.id}`, () => api('POST', `/v1/dlq/${d.id}/retry`), load)),
        adminButton('Drop', { class: 'danger', 'data-action': 'drop' }, e => act(e.target, `Drop of dead letter ${d.id}`, () => api('DELETE', `/v1/dlq/${d.id}`), load))) : null))));
    if (!res.data.length) body.append(h('tr', {}, h('td', { colspan: 8, class: 'muted', text: `No ${status === 'all' ? '' : `${status} `}dead letters.` })));
  };
  await load();
  page = { onEvent: debounce(ev => { if (ev.type === 'run' || ev.type === 'dlq') load(); }, 250) };
}

// ---- plugins -----------------------------------------------------------------------

async function pluginsPage() {
  const body = h('tbody');
  const nameSelect = h('select', { id: 'upload-name', name: 'name' });
  const file = h('input', { type: 'file', id: 'upload-file', accept: '.wasm,application/wasm' });
  const approve = h('input', { type: 'checkbox', id: 'upload-approve' });
  const canary = h('input', { type: 'number', id: 'upload-canary', min: '1', max: '100', placeholder: 'all runs', class: 'narrow' });
  const auto = h('input', { type: 'checkbox', id: 'upload-auto' });
  const uploadButton = adminButton('Swap in', { class: 'primary', id: 'upload' }, async e => {
    const f = file.files[0];
    if (!f) { flash('bad', 'Choose a .wasm component first.'); return; }
    const bytes = await f.arrayBuffer();
    const query = new URLSearchParams();
    if (approve.checked) query.set('approve', 'true');
    if (canary.value) { query.set('canary', canary.value); if (auto.checked) query.set('auto', 'true'); }
    const q = query.toString();
    await act(e.target, `Swap of ${nameSelect.value}`, () =>
      api('PUT', `/v1/plugins/${encodeURIComponent(nameSelect.value)}${q ? '?' + q : ''}`, bytes, 'application/wasm'),
    async res => {
      if (res.ok && res.data.canary) flash('good', `${res.data.name} ${res.data.canary.version} serves ${res.data.canary.percent}% of new runs as a canary; ${res.data.version} the rest`);
      else if (res.ok) flash('good', `${res.data.name} now serves version ${res.data.version} (sha256 ${res.data.sha256.slice(0, 12)}…), was ${res.data.previous_version || 'none'}`);
      await load();
    });
  });
  const figures = st => st ? `${st.runs_ok} ok, ${st.runs_failed} failed${st.p50_ms != null ? `, p50 ${st.p50_ms} ms, p99 ${st.p99_ms} ms` : ''}` : '';
  const post = (p, what, label) => adminButton(label, { 'data-action': what }, e =>
    act(e.target, `${label} of ${p.name}`, () => api('POST', `/v1/plugins/${encodeURIComponent(p.name)}/${what}`), load));
  main.replaceChildren(h('h1', { text: 'Plugins' }),
    h('table', { id: 'plugins' },
      h('thead', {}, h('tr', {}, ['Name', 'Version', 'World', 'sha256', 'Runs served', 'Runs', 'Loaded', 'Previous versions', 'Canary', ''].map(t => h('th', { text: t })))),
      body),
    h('h2', { text: 'Swap a plugin by upload' }),
    h('p', { class: 'muted', text: 'Runs in flight finish on the version they started with; new runs get the upload once it has compiled and passed its checks.' }),
    h('div', { class: 'filters' },
      h('label', {}, 'Plugin', nameSelect),
      h('label', {}, 'Component (.wasm)', file),
      h('label', {}, 'Approve new hosts or world', approve),
      h('label', {}, 'Canary: % of new runs', canary),
      h('label', {}, 'Canary decides itself', auto),
      uploadButton));
  const load = async () => {
    const res = await api('GET', '/v1/plugins');
    if (!res.ok) { flash('bad', problem(res)); return; }
    const list = res.data.slice().sort((a, b) => a.name.localeCompare(b.name));
    const chosen = nameSelect.value;
    nameSelect.replaceChildren(...list.map(p => h('option', { value: p.name, selected: p.name === chosen, text: p.name })));
    body.replaceChildren(...list.map(p => h('tr', { 'data-plugin': p.name },
      h('td', { class: 'mono', text: p.name }),
      h('td', { class: 'version', text: p.version }),
      h('td', { text: p.world }),
      h('td', { class: 'mono sha', title: p.sha256, text: `${p.sha256.slice(0, 12)}…` }),
      h('td', { class: 'num', text: p.runs_served }),
      h('td', { class: 'stats', text: figures(p.stats) }),
      h('td', { text: p.loaded_at }),
      h('td', { class: 'mono', text: (p.previous_versions || []).map(v => `${v.version} (${v.sha256.slice(0, 8)})`).join(', ') }),
      h('td', { class: 'canary' }, p.canary ? `${p.canary.version} (${p.canary.sha256.slice(0, 8)}) at ${p.canary.percent}%${p.canary.auto ? ', deciding itself' : ''}: ${figures(p.canary.stats)}` : ''),
      h('td', {}, p.canary ? [post(p, 'promote', 'Promote'), post(p, 'rollback', 'Roll back canary')]
        : (p.previous_versions || []).length ? post(p, 'rollback', 'Roll back') : null))));
  };
  await load();
  page = { onEvent: debounce(ev => { if (ev.type === 'plugin' || ev.type === 'run') load(); }, 500) };
}

// ---- services and triggers ----------------------------------------------------------

async function servicesPage() {
  const body = h('tbody');
  main.replaceChildren(h('h1', { text: 'Services' }),
    h('p', { class: 'muted', text: 'Outbound calls since this server started, per service: every attempt, retries included.' }),
    h('table', { id: 'services' },
      h('thead', {}, h('tr', {}, ['Service', 'Calls', 'Success rate', 'p50', 'p99', 'Errors by kind', 'Breaker', 'Rate-limit headroom'].map(t => h('th', { text: t })))),
      body));
  const load = async () => {
    const res = await api('GET', '/v1/services');
    if (!res.ok) { flash('bad', problem(res)); return; }
    body.replaceChildren(...res.data.map(x => h('tr', { 'data-service': x.service },
      h('td', { class: 'mono', text: x.service }),
      h('td', { class: 'num', text: x.calls }),
      h('td', { class: 'num', text: x.success_rate === null ? '' : `${(x.success_rate * 100).toFixed(1)}%` }),
      h('td', { class: 'num', text: `${x.p50_ms.toFixed(1)} ms` }),
      h('td', { class: 'num', text: `${x.p99_ms.toFixed(1)} ms` }),
      h('td', { text: Object.entries(x.errors).map(([k, v]) => `${k}: ${v}`).join(', ') }),
      h('td', {}, badge(x.breaker)),
      h('td', { class: 'num', text: x.rate_limit ? `${x.rate_limit.remaining}${x.rate_limit.limit ? ` / ${x.rate_limit.limit}` : ''}` : '' }))));
    if (!res.data.length) body.append(h('tr', {}, h('td', { colspan: 8, class: 'muted', text: 'No outbound calls yet.' })));
  };
  await load();
  page = { onEvent: debounce(ev => { if (ev.type === 'run') load(); }, 1000) };
}

async function triggersPage() {
  const res = await api('GET', '/v1/triggers');
  if (!res.ok) { flash('bad', problem(res)); return; }
  main.replaceChildren(h('h1', { text: 'Triggers' }),
    h('table', { id: 'triggers' },
      h('thead', {}, h('tr', {}, ['Path', 'Pipeline', 'Type', 'Signature'].map(t => h('th', { text: t })))),
      h('tbody', {}, res.data.length ? res.data.map(t => h('tr', {},
        h('td', { class: 'mono', text: `POST ${t.path}` }),
        h('td', {}, h('a', { href: `#/runs?pipeline=${encodeURIComponent(t.pipeline)}`, text: t.pipeline })),
        h('td', { text: t.type }),
        h('td', { text: t.signature }))) : h('tr', {}, h('td', { colspan: 4, class: 'muted', text: 'No webhook triggers.' })))));
}

route();
