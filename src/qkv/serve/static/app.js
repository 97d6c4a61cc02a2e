// qkv chat page: plain JS, no build step. Streams /v1/chat/completions over fetch and
// parses the server-sent events by hand (EventSource cannot POST).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}] sent with every request
let model = null;
let controller = null;       // AbortController of the reply being streamed

// --- tabs (the "Inside" tab's panel is filled by the inspect view, if present) ---------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) {
      t.classList.toggle("active", t === tab);
      t.setAttribute("aria-selected", t === tab ? "true" : "false");
      $(t.dataset.panel).classList.toggle("active", t === tab);
    }
  });
}

// --- settings ------------------------------------------------------------------------
// qkv's shared sampling defaults, the same as `qkv generate` and the server's
// (qkv.infer.sampling.DEFAULT_SAMPLING); a test keeps them equal.
const SAMPLING_DEFAULTS = { temperature: 0.7, top_p: 0.95, top_k: 40, min_p: 0.05 };
for (const [id, value] of Object.entries(SAMPLING_DEFAULTS)) $(id).value = value;
for (const id of ["temperature", "top_p", "min_p"]) {
  const input = $(id);
  const show = () => { $(id + "-val").textContent = Number(input.value).toFixed(2); };
  input.addEventListener("input", show);
  show();
}
$("api_key").value = localStorage.getItem("qkv_api_key") || "";
$("api_key").addEventListener("change", () => localStorage.setItem("qkv_api_key", $("api_key").value));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    $("model-name").textContent = model + " · context " + body.data[0].max_model_len;
  } catch (e) {
    $("model-name").textContent = "model unavailable: " + e.message;
  }
}

// --- messages ------------------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Yields parsed JSON payloads of `data:` events until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// --- JSON schema: while its box is ticked, every message asks for JSON under it ---------
// Checked here first, so a schema that is not JSON never reaches the server; the server
// still refuses (400 naming response_format) one that parses but the grammar library cannot use.
function responseFormat() {
  const box = $("schema");
  box.removeAttribute("aria-invalid");
  if (!$("schema_on").checked) return null;
  let schema;
  try {
    schema = JSON.parse(box.value);
  } catch (e) {
    box.setAttribute("aria-invalid", "true");
    throw new Error("JSON schema: not valid JSON (" + e.message + "); fix it or untick the box");
  }
  if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
    box.setAttribute("aria-invalid", "true");
    throw new Error('JSON schema: must be a JSON object, e.g. {"type": "object"}; fix it or untick the box');
  }
  return { type: "json_schema", json_schema: { name: "page_schema", schema, strict: true } };
}

async function send(text, format = null) {
  if (!model) await loadModel();
  $("stat-error").textContent = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("streaming");
  const system = $("system").value.trim();
  const request = {
    model,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    top_k: Number($("top_k").value),
    min_p: Number($("min_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if (format) request.response_format = format;
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null, reply = "", finish = null;
  const showRate = () => {
    const tokens = usage ? usage.completion_tokens : chunks;
    const secs = (performance.now() - (tFirst ?? t0)) / 1000;
    $("stat-tokens").textContent = String(tokens);
    if (tFirst !== null && secs > 0 && tokens > 1) $("stat-tps").textContent = ((tokens - 1) / secs).toFixed(1);
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.status + " " + response.statusText);
    }
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      if (event.choices && event.choices[0] && event.choices[0].finish_reason) finish = event.choices[0].finish_reason;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        if (tFirst === null) {
          tFirst = performance.now();
          $("stat-ttft").textContent = (tFirst - t0).toFixed(0) + " ms";
        }
        chunks += 1;
        reply += delta.content;
        out.textContent = reply;
        $("messages").scrollTop = $("messages").scrollHeight;
        showRate();
      }
    }
    showRate();
    if (format && finish === "length") {
      $("stat-error").textContent = "cut at max tokens before the schema was met: the JSON may be incomplete; raise Max tokens";
    }
  } catch (e) {
    if (e.name !== "AbortError") $("stat-error").textContent = e.message;
  } finally {
    out.parentElement.classList.remove("streaming");
    history.push({ role: "assistant", content: reply });
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  let format;
  try {
    format = responseFormat();
  } catch (err) {  // refused here: the message stays in the box, nothing is sent
    $("stat-error").textContent = err.message;
    return;
  }
  $("prompt").value = "";
  send(text, format);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });

loadModel();
