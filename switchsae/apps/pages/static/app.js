"use strict";
// switchsae feature pages: an index of features (sortable, filterable, searchable, one page of rows
// at a time) and a view per feature, routed by the URL hash: "#f=ID" shows feature ID, anything else
// the index with its state ("#sort=density&desc=1&expert=2&q=paris&page=3"). Data files are scripts
// calling SWITCHSAE.put(name, data), loaded with <script src>, so the pages work from file:// as well
// as over HTTP. Feature records come in chunks of meta.chunk, loaded when a feature is opened.
const SWITCHSAE = (() => {
  const PAGE_ROWS = 100;
  const data = {};
  const waiting = {};
  let meta, index, vocab, position, searchable, view;
  let lastIndexHash = "";
  let shown = 0;  // counts feature views opened, so a late chunk never overwrites a newer view

  function put(name, value) {
    data[name] = value;
    (waiting[name] || []).forEach((done) => done(value));
    delete waiting[name];
  }

  function load(name, done, failed) {
    if (name in data) return done(data[name]);
    if (waiting[name]) return waiting[name].push(done);
    waiting[name] = [done];
    const script = document.createElement("script");
    script.src = "data/" + name + ".js";
    script.onerror = () => { delete waiting[name]; failed("cannot load data/" + name + ".js"); };
    document.body.appendChild(script);
  }

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  const fmt = (x) => (x === 0 ? "0" : Math.abs(x) >= 0.01 && Math.abs(x) < 1e4 ? String(+x.toPrecision(3)) : x.toExponential(2));
  const tokenText = (id) => {
    const text = vocab[id];
    return text === undefined ? "<" + id + ">" : text.replace(/\n/g, "↵").replace(/\t/g, "⇥");
  };
  const expertName = (e) => (meta.shared_expert && e === meta.experts - 1 ? `${e} (shared)` : `${e}`);
  const chips = (ids) => ids.map((t) => `<span class="chip">${esc(tokenText(t))}</span>`).join("");

  // ---- index ------------------------------------------------------------------------------
  function indexState(params) {
    const sort = ["id", "expert", "density", "max"].includes(params.get("sort")) ? params.get("sort") : "density";
    return {q: params.get("q") || "", expert: params.get("expert") || "", min: params.get("min") || "",
            max: params.get("max") || "", sort, desc: params.get("desc") !== "0", page: +params.get("page") || 0};
  }

  function stateHash(st) {
    const params = new URLSearchParams();
    for (const key of ["q", "expert", "min", "max"]) if (st[key] !== "") params.set(key, st[key]);
    params.set("sort", st.sort);
    params.set("desc", st.desc ? "1" : "0");
    if (st.page) params.set("page", st.page);
    return params.toString();
  }

  function selectedRows(st) {
    const q = st.q.trim().toLowerCase();
    const lo = st.min === "" ? -Infinity : +st.min, hi = st.max === "" ? Infinity : +st.max;
    const rows = [];
    for (let i = 0; i < index.id.length; i++) {
      if (st.expert !== "" && index.expert[i] !== +st.expert) continue;
      if (index.density[i] < lo || index.density[i] > hi) continue;
      if (q && !searchable[i].includes(q)) continue;
      rows.push(i);
    }
    const key = index[st.sort], sign = st.desc ? -1 : 1;
    rows.sort((a, b) => sign * (key[a] - key[b]) || index.id[a] - index.id[b]);
    return rows;
  }

  function indexControls(st) {
    const experts = meta.experts > 1
      ? `<label>expert <select id="expert"><option value="">all</option>${
          Array.from({length: meta.experts}, (_, e) => `<option value="${e}">${expertName(e)}</option>`).join("")}</select></label>`
      : "";
    const header = [["id", "feature"], ...(meta.experts > 1 ? [["expert", "expert"]] : []), ["density", "density"],
                    ["max", "max act"], [null, "top tokens"], [null, "boosts"]];
    view.innerHTML = `
      <div class="controls">
        <label>token <input id="search" type="search" placeholder="search top or boosted tokens"></label>
        ${experts}
        <label>density ≥ <input id="min" size="7" placeholder="0"></label>
        <label>≤ <input id="max" size="7" placeholder="1"></label>
        <span id="count"></span>
      </div>
      <table id="features"><thead><tr>${header.map(([key, label]) =>
        `<th${key ? ` data-sort="${key}" class="sortable"` : ""}>${label}</th>`).join("")}</tr></thead><tbody></tbody></table>
      <div class="pager"><button id="prev">‹ prev</button> <span id="page"></span> <button id="next">next ›</button></div>`;
    view.dataset.view = "index";
    const field = (id) => view.querySelector("#" + id);
    for (const id of ["search", "expert", "min", "max"]) {
      if (!field(id)) continue;
      field(id).value = st[id === "search" ? "q" : id];
      field(id).addEventListener(id === "expert" ? "change" : "input", () => {
        const now = currentIndexState();
        now[id === "search" ? "q" : id] = field(id).value;
        now.page = 0;
        updateIndex(now);
      });
    }
    view.querySelectorAll("th.sortable").forEach((th) => th.addEventListener("click", () => {
      const now = currentIndexState();
      now.desc = now.sort === th.dataset.sort ? !now.desc : ["density", "max"].includes(th.dataset.sort);
      now.sort = th.dataset.sort;
      now.page = 0;
      updateIndex(now);
    }));
    field("prev").addEventListener("click", () => { const now = currentIndexState(); now.page--; updateIndex(now); });
    field("next").addEventListener("click", () => { const now = currentIndexState(); now.page++; updateIndex(now); });
  }

  const currentIndexState = () => indexState(new URLSearchParams(location.hash.slice(1)));

  function updateIndex(st) {
    history.replaceState(null, "", "#" + stateHash(st));
    renderRows(st);
  }

  function renderRows(st) {
    const started = performance.now();
    const rows = selectedRows(st);
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
    st.page = Math.min(Math.max(0, st.page), pages - 1);
    const body = rows.slice(st.page * PAGE_ROWS, (st.page + 1) * PAGE_ROWS).map((i) => `<tr>
      <td><a href="#f=${index.id[i]}">${index.id[i]}</a></td>${meta.experts > 1 ? `<td>${index.expert[i]}</td>` : ""}
      <td>${fmt(index.density[i])}</td><td>${fmt(index.max[i])}</td>
      <td class="tokens">${chips(index.top[i])}</td><td class="tokens">${chips(index.boost[i])}</td></tr>`).join("");
    view.querySelector("#features tbody").innerHTML = body;
    view.querySelector("#count").textContent = `${rows.length.toLocaleString("en")} of ${index.id.length.toLocaleString("en")} features`;
    view.querySelector("#page").textContent = `page ${st.page + 1} of ${pages}`;
    view.querySelector("#prev").disabled = st.page === 0;
    view.querySelector("#next").disabled = st.page >= pages - 1;
    view.querySelectorAll("th.sortable").forEach((th) => {
      th.classList.toggle("sorted", th.dataset.sort === st.sort);
      th.dataset.arrow = th.dataset.sort === st.sort ? (st.desc ? "▼" : "▲") : "";
    });
    lastIndexHash = stateHash(st);
    document.body.dataset.renderMs = (performance.now() - started).toFixed(1);
  }

  // ---- one feature ------------------------------------------------------------------------
  function histogram(hist) {
    const width = 380, height = 120, n = hist.counts.length;
    if (!n) return `<p class="muted">never fired</p>`;
    const peak = Math.max(...hist.counts), binWidth = hist.edge / meta.config.bins;
    const bars = hist.counts.map((c, b) => {
      const h = (c / peak) * (height - 20), x = (b / n) * width;
      return `<rect x="${x.toFixed(1)}" y="${(height - 16 - h).toFixed(1)}" width="${Math.max(1, width / n - 1).toFixed(1)}" ` +
        `height="${h.toFixed(1)}"><title>${fmt(b * binWidth)}–${fmt((b + 1) * binWidth)}: ${c}</title></rect>`;
    }).join("");
    return `<svg id="hist" viewBox="0 0 ${width} ${height}" width="${width}" height="${height}">${bars}
      <text x="0" y="${height - 2}">0</text><text x="${width}" y="${height - 2}" text-anchor="end">${fmt(n * binWidth)}</text>
      <text x="2" y="10">${peak}</text></svg>`;
  }

  function example([, value, at, tokens, others], peak) {  // see switchsae/apps/records.py
    const acts = tokens.map((_, k) => (k === at ? value : 0));
    for (const [k, a] of others) acts[k] = a;
    const spans = tokens.map((t, k) => {
      const a = acts[k], alpha = a === null ? 0 : Math.min(1, a / peak);
      const tip = `${tokenText(t)}: ${a === null ? "not cached" : fmt(a)}`;
      return `<span class="tok${k === at ? " hit" : ""}" style="background:rgba(255,120,0,${alpha.toFixed(2)})" ` +
        `title="${esc(tip)}">${esc(tokenText(t))}</span>`;
    }).join("");
    return `<div class="ex"><span class="val">${fmt(value)}</span><span class="ctx">${spans}</span></div>`;
  }

  function tokenList(pairs) {
    return `<ol class="logits">${pairs.map(([t, v]) => `<li><span class="chip">${esc(tokenText(t))}</span> ${fmt(v)}</li>`).join("")}</ol>`;
  }

  function nearList(pairs) {
    return `<ol class="near">${pairs.map(([j, cos]) => {
      const label = position.has(j) ? `<a href="#f=${j}">${j}</a>` : `${j}`;
      const expert = meta.experts > 1 ? ` (expert ${expertName(Math.floor(j / (meta.width / meta.experts)))})` : "";
      return `<li>${label}${expert} cos ${fmt(cos)}</li>`;
    }).join("")}</ol>`;
  }

  function featureHtml(r) {
    const at = position.get(r.id), prev = index.id[at - 1], next = index.id[at + 1];
    const stats = [["density", fmt(r.density)], ["fires on", `${r.count.toLocaleString("en")} of ${meta.rows.toLocaleString("en")} tokens`], ["max act", fmt(r.max)],
                   ["mean act", fmt(r.mean)]];
    if (r.router) stats.push(["router p (mean / max)", `${fmt(r.router.mean)} / ${fmt(r.router.max)}`]);
    const samples = r.samples.map((g) => `<h3>${fmt(g.lo)} – ${fmt(g.hi)}</h3>${g.examples.map((e) => example(e, r.max)).join("")}`);
    return `
      <nav><a id="back" href="#${lastIndexHash}">← all features</a>
        ${prev !== undefined ? ` · <a href="#f=${prev}">‹ ${prev}</a>` : ""}${next !== undefined ? ` · <a href="#f=${next}">${next} ›</a>` : ""}</nav>
      <h1>Feature ${r.id}${r.expert !== undefined ? ` <span class="badge">expert ${expertName(r.expert)}</span>` : ""}</h1>
      <dl class="stats">${stats.map(([k, v]) => `<div><dt>${k}</dt><dd>${v}</dd></div>`).join("")}</dl>
      <div class="panels">
        <section><h2>Activation histogram</h2>${histogram(r.hist)}</section>
        <section><h2>Boosts</h2>${tokenList(r.boost)}</section>
        <section><h2>Suppresses</h2>${tokenList(r.suppress)}</section>
        ${r.near ? `<section><h2>Nearest decoder rows${meta.experts > 1 ? " in other experts" : ""}</h2>${nearList(r.near)}</section>` : ""}
      </div>
      <h2>Top activations</h2><div id="top">${r.top.map((e) => example(e, r.max)).join("") || "<p class='muted'>none</p>"}</div>
      <h2>Samples by activation interval</h2><div id="samples">${samples.join("") || "<p class='muted'>none</p>"}</div>`;
  }

  function showFeature(text) {
    view.dataset.view = "feature";
    const ticket = ++shown, at = position.get(Number(text));
    if (at === undefined) {
      view.innerHTML = `<p class="error">Feature ${esc(text)} is not in these pages; they hold ${index.id.length.toLocaleString("en")} features ` +
        `(ids ${index.id[0]} to ${index.id[index.id.length - 1]}).</p><p><a id="back" href="#${lastIndexHash}">← all features</a></p>`;
      return;
    }
    view.innerHTML = "<p>Loading…</p>";
    const chunk = "features_" + String(Math.floor(at / meta.chunk)).padStart(3, "0");
    load(chunk, (records) => {
      if (ticket !== shown || view.dataset.view !== "feature") return;  // the user moved on meanwhile
      view.innerHTML = featureHtml(records[at % meta.chunk]);
      window.scrollTo(0, 0);
    }, (message) => { view.innerHTML = `<p class="error">${esc(message)}</p>`; });
  }

  // ---- routing ------------------------------------------------------------------------------
  function route() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.has("f")) return showFeature(params.get("f"));
    const st = indexState(params);
    if (view.dataset.view !== "index") indexControls(st);
    renderRows(st);
  }

  function start() {
    view = document.getElementById("view");
    meta = data.meta; index = data.index; vocab = data.vocab;
    if (!meta || !index || !vocab) {
      view.innerHTML = `<p class="error">The data files next to this page are missing or incomplete.</p>`;
      return;
    }
    position = new Map(index.id.map((id, i) => [id, i]));
    searchable = index.id.map((_, i) => "\u0001" + index.top[i].concat(index.boost[i])
      .map((t) => tokenText(t).trim().toLowerCase()).join("\u0001") + "\u0001");
    document.getElementById("run").textContent = `${meta.arch} SAE · ${meta.width.toLocaleString("en")} latents` +
      (meta.experts > 1 ? ` · ${meta.experts} experts` : "") + ` · k ${meta.k} · ${meta.model} ${meta.hook} · ` +
      `${meta.rows.toLocaleString("en")} tokens`;
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.readyMs = performance.now().toFixed(1);
  }

  return {put, start};
})();
