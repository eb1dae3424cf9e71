// The Replimesh dashboard: polls /api/status once a second and renders
// clones and links, groups, stores and message rates (small SVG charts).
const $ = id => document.getElementById(id);
const POINTS = 60;
const series = new Map(); // counter name -> {last, values[]}
const CHARTS = [
  ['messages_in', 'messages in'], ['messages_out', 'messages out'],
  ['dropped', 'dropped'], ['requests', 'requests'],
  ['actions', 'store actions'], ['connections', 'connections (now)'],
];

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

function rows(tbody, items, cells) {
  tbody.innerHTML = items.map(it => `<tr class="row" data-id="${esc(it.id ?? it.name)}">` +
    cells(it).map(c => `<td>${c}</td>`).join('') + '</tr>').join('');
}

function fmtAge(s) {
  if (s === null || s === undefined) return 'never';
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function sparkline(values) {
  const max = Math.max(1, ...values);
  const w = 200, h = 48;
  const pts = values.map((v, i) => `${(i / (POINTS - 1)) * w},${h - 2 - (v / max) * (h - 6)}`).join(' ');
  return `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none"><polyline fill="none" stroke="#2f6fde" stroke-width="1.5" points="${pts}"/></svg>`;
}

function updateCharts(st, dt) {
  const c = st.counters || {};
  for (const [key] of CHARTS) {
    let s = series.get(key);
    if (!s) { s = { last: null, values: [] }; series.set(key, s); }
    const v = Number(c[key] || 0);
    let rate;
    if (key === 'connections') rate = v; // a gauge
    else rate = s.last === null || dt <= 0 ? 0 : Math.max(0, (v - s.last) / dt);
    s.last = v;
    s.values.push(rate);
    if (s.values.length > POINTS) s.values.shift();
  }
  $('charts').innerHTML = CHARTS.map(([key, label]) => {
    const s = series.get(key);
    const vals = s.values.length < POINTS ? Array(POINTS - s.values.length).fill(0).concat(s.values) : s.values;
    const now = s.values[s.values.length - 1] || 0;
    return `<div class="chart" data-metric="${key}"><div class="label"><span>${label}</span><b>${Math.round(now)}</b></div>${sparkline(vals)}</div>`;
  }).join('');
}

function drawLinks(st) {
  const clones = st.clones || [];
  const n = clones.length;
  const cx = 200, cy = 110, r = n > 1 ? 80 : 0;
  const pos = new Map(clones.map((c, i) => [c.id, [cx + r * Math.cos(2 * Math.PI * i / n - Math.PI / 2), cy + r * Math.sin(2 * Math.PI * i / n - Math.PI / 2)]]));
  let svg = '';
  for (const l of st.links || []) {
    const a = pos.get(l.from), b = pos.get(l.to);
    if (a && b) svg += `<line x1="${a[0]}" y1="${a[1]}" x2="${b[0]}" y2="${b[1]}" stroke="#888" stroke-width="2"/>`;
  }
  for (const c of clones) {
    const [x, y] = pos.get(c.id);
    svg += `<circle cx="${x}" cy="${y}" r="14" fill="${c.up ? '#0a7d32' : '#b3261e'}"/>` +
      `<text x="${x}" y="${y + 30}" text-anchor="middle" font-size="11">${esc(c.id)}</text>`;
  }
  $('links').innerHTML = svg;
}

let lastTime = null;
async function tick() {
  try {
    // With `security.admin_token`, open the dashboard as /?token=...: the
    // token is passed on to /api/status.
    const token = new URLSearchParams(location.search).get('token');
    const res = await fetch('/api/status' + (token ? '?token=' + encodeURIComponent(token) : ''), { cache: 'no-store' });
    const st = await res.json();
    const now = performance.now();
    const dt = lastTime === null ? 0 : (now - lastTime) / 1000;
    lastTime = now;
    $('error').textContent = '';
    $('node').textContent = `${st.id} · ${st.url || ''}`;
    $('uptime').textContent = `up ${Math.round(st.uptime_s || 0)} s`;
    rows($('clones'), st.clones || [], c => [esc(c.id) + (c.self ? ' (this)' : ''), esc(c.url || ''),
      `<span class="${c.up ? 'up' : 'down'}">${c.up ? 'up' : 'down'}</span>`, c.linked ? 'yes' : 'no']);
    rows($('groups'), st.groups || [], g => [esc(g.name), g.subscribers]);
    rows($('stores'), st.stores || [], s => [esc(s.name), esc(s.role || ''), s.seq, s.replicas ?? '—',
      s.backup ? `${fmtAge(s.backup.age_s)}${s.backup.failures ? ` · ${s.backup.failures} failures` : ''}` : '—']);
    drawLinks(st);
    updateCharts(st, dt);
    document.body.dataset.ready = 'yes';
  } catch (e) {
    $('error').textContent = 'cannot reach the node: ' + e;
  }
}
tick();
setInterval(tick, 1000);
