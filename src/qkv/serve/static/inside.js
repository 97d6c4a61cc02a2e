// qkv "inside" view: the attention map of a chosen layer/head for the last reply (or any
// text), and MoE routing when the model has experts. Calls POST /v1/inside/attention
// (src/qkv/serve/inside.py). Plain JS, no build step; fills #inside-root.
"use strict";

(function () {
  const root = document.getElementById("inside-root");
  if (!root) return;
  // fixed markup only: nothing the server sends ever goes through innerHTML
  root.innerHTML = `
    <form id="inside-form">
      <label>Text <textarea id="inside-text" rows="3" placeholder="(the last reply)"></textarea></label>
      <label>Layer <input type="number" id="inside-layer" min="0" value="0"></label>
      <label>Head <input type="number" id="inside-head" min="0" value="0"></label>
      <button type="submit" id="inside-show">Show attention</button>
      <button type="button" id="inside-last">Use last reply</button>
    </form>
    <p id="inside-status" class="muted"></p>
    <canvas id="inside-map" width="480" height="480" aria-label="attention map"></canvas>
    <div id="inside-routing"></div>`;
  const el = (id) => document.getElementById(id);

  function lastReply() {
    const nodes = document.querySelectorAll("#messages .msg.assistant .content");
    return nodes.length ? nodes[nodes.length - 1].textContent : "";
  }

  function authHeaders() {
    const h = { "Content-Type": "application/json" };
    const key = (el("api_key") && el("api_key").value.trim()) || "";
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function draw(data) {
    const cv = el("inside-map"), ctx = cv.getContext("2d");
    const T = data.tokens.length, cell = Math.max(2, Math.floor(440 / T)), pad = 40;
    cv.width = cv.height = pad + cell * T;
    ctx.clearRect(0, 0, cv.width, cv.height);
    for (let q = 0; q < T; q++) {
      for (let k = 0; k < T; k++) {
        const a = data.attention[q][k];
        const v = Math.round(255 * (1 - Math.sqrt(a)));  // sqrt: small weights stay visible
        ctx.fillStyle = `rgb(${v},${v},255)`;
        ctx.fillRect(pad + k * cell, pad + q * cell, cell, cell);
      }
    }
    ctx.fillStyle = "#333";
    ctx.font = "10px sans-serif";
    ctx.fillText(`layer ${data.layer} head ${data.head}: rows = queries, columns = keys`, 2, 12);
    if (cell >= 8) {
      data.tokens.forEach((t, i) => {
        ctx.save();
        ctx.translate(pad + i * cell + cell - 2, pad - 2);
        ctx.rotate(-Math.PI / 2);
        ctx.fillText(t.slice(0, 6), 0, 0);
        ctx.restore();
        ctx.fillText(t.slice(0, 6), 2, pad + i * cell + cell - 1);
      });
    }
  }

  // Model output (tokens) only ever goes in through textContent: it is data, never markup.
  function node(tag, text, attrs) {
    const n = document.createElement(tag);
    if (text !== undefined) n.textContent = text;
    Object.assign(n, attrs || {});
    return n;
  }

  function drawRouting(r, tokens) {
    const box = el("inside-routing");
    box.replaceChildren();
    if (!r) return;
    box.append(node("h3", `MoE routing (top-${r.top_k} of ${r.n_expert})`));
    const table = node("table", undefined, { id: "inside-load" });
    const head = node("tr");
    head.append(node("th"), ...r.load[0].map((_, e) => node("th", `e${e}`)));
    table.append(head);
    r.load.forEach((row, l) => {
      const tr = node("tr");
      tr.append(node("th", `layer ${l}`));
      row.forEach((x) => {
        const td = node("td", x.toFixed(2));
        td.style.background = `rgba(0,0,255,${Math.min(1, x * r.n_expert / 2)})`;
        tr.append(td);
      });
      table.append(tr);
    });
    const layer = Math.min(Number(el("inside-layer").value) || 0, r.choices.length - 1);
    const picks = node("p", `layer ${layer}: `, { id: "inside-choices" });
    tokens.forEach((t, i) => {
      const experts = r.choices[layer][i].join(",");
      const span = node("span", t, { title: `experts ${experts}` });
      span.append(node("sub", experts));
      picks.append(span, " ");
    });
    box.append(table, picks);
  }

  async function show(ev) {
    if (ev) ev.preventDefault();
    let text = el("inside-text").value;
    if (!text.trim()) { text = lastReply(); el("inside-text").value = text; }
    if (!text.trim()) { el("inside-status").textContent = "no reply yet: chat first, or type a text"; return; }
    el("inside-status").textContent = "running…";
    try {
      const r = await fetch("/v1/inside/attention", {
        method: "POST", headers: authHeaders(),
        body: JSON.stringify({ text, layer: Number(el("inside-layer").value), head: Number(el("inside-head").value) }),
      });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
      el("inside-status").textContent =
        `${body.tokens.length} tokens · mean entropy ${body.mean_entropy.toFixed(2)} nats · ${body.n_layer} layers × ${body.n_head} heads`;
      draw(body);
      drawRouting(body.routing, body.tokens);
    } catch (e) {
      el("inside-status").textContent = "error: " + e.message;
    }
  }

  el("inside-form").addEventListener("submit", show);
  el("inside-last").addEventListener("click", () => { el("inside-text").value = lastReply(); show(); });
  const tab = document.getElementById("tab-inside");
  if (tab) tab.addEventListener("click", () => { if (!el("inside-text").value) el("inside-text").value = lastReply(); });
})();
