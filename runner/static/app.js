// gpt-sql serve's page: plain JavaScript, no build step, nothing fetched from elsewhere.
// Generation streams from /v1/completions (the OpenAI API, as server-sent events, with logprobs and token ids);
// a token's inside view comes from /api/inspect (the query's inspect variant); /api/sql shows a completion's query.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { tokens: [], prompt: "", model: "", controller: null, open: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value || sessionStorage.getItem("gpt-sql-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("key-label").hidden = false;
    setStatus("This server needs an API key: enter it above.", true);
    return;
  }
  if (!r.ok) { setStatus(await errorText(r), true); return; }
  const body = await r.json();
  const select = $("model");
  select.textContent = "";
  for (const m of body.data) {
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    select.append(o);
  }
  setStatus(body.data.length ? "" : "No model is loaded.", !body.data.length);
}

function request() {
  const num = (id) => $(id).value === "" ? undefined : Number($(id).value);
  const body = {
    model: $("model").value, prompt: $("prompt").value, max_tokens: num("max_tokens"),
    temperature: num("temperature"), top_p: num("top_p"), top_n: num("top_n"), seed: num("seed"),
    logprobs: 5, stream: true,
  };
  if ($("stop").value) body.stop = $("stop").value;
  return body;
}

// --- generation ---------------------------------------------------------------------------------------------

async function generate() {
  if (state.controller) return;
  closeInspect();
  const body = request();
  state.prompt = body.prompt;
  state.model = body.model;
  state.tokens = [];
  const out = $("output");
  out.textContent = "";
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt-text";
  promptSpan.textContent = body.prompt;
  out.append(promptSpan);
  showGenerationSql(body);
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  const started = performance.now();
  let first = null;
  setStatus("prefill: the query reads the prompt…");
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                               signal: state.controller.signal });
    if (!r.ok) { setStatus(await errorText(r), true); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", reason = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { setStatus(chunk.error.message, true); continue; }
        for (const c of chunk.choices) {
          if (c.logprobs && c.logprobs.token_ids.length) {
            if (first === null) first = performance.now() - started;
            addToken(c.text, c.logprobs);
            setStatus(`${state.tokens.length} tokens, first after ${(first / 1000).toFixed(2)} s`);
          } else if (c.text) {
            appendText(c.text);
          }
          if (c.finish_reason) reason = c.finish_reason;
        }
      }
    }
    const total = ((performance.now() - started) / 1000).toFixed(2);
    setStatus(`${state.tokens.length} tokens in ${total} s` +
              (first !== null ? `, the first after ${(first / 1000).toFixed(2)} s` : "") +
              (reason ? ` (finish: ${reason})` : ""));
  } catch (e) {
    if (e.name === "AbortError") setStatus(`stopped after ${state.tokens.length} tokens: the query was cancelled`);
    else setStatus(String(e), true);
  } finally {
    state.controller = null;
    $("generate").disabled = false;
    $("stop-button").disabled = true;
  }
}

function appendText(text) {
  const last = $("output").lastElementChild;
  if (last && last.classList.contains("tok")) last.textContent += text;
  else $("output").append(document.createTextNode(text));
}

function shade(span, p) {
  span.style.setProperty("--p", p.toFixed(3));
  span.classList.toggle("dark", p > 0.55);
}

function addToken(text, lp) {
  const k = state.tokens.length;
  const token = { id: lp.token_ids[0], text: lp.tokens[0], logprob: lp.token_logprobs[0], top: lp.top_logprobs[0] };
  state.tokens.push(token);
  const span = document.createElement("span");
  span.className = "tok";
  span.tabIndex = 0;
  span.setAttribute("role", "button");
  span.dataset.k = k;
  const p = Math.exp(token.logprob);
  span.textContent = text === "" && token.text ? "\u200b" : text;  // a part of a character: shown with the next
  span.setAttribute("aria-label", `token ${k + 1} ${JSON.stringify(token.text)}, probability ${(p * 100).toFixed(1)}%`);
  shade(span, p);
  $("output").append(span);
}

function showTooltip(span) {
  const t = state.tokens[Number(span.dataset.k)];
  const tip = $("tooltip");
  const rows = Object.entries(t.top).map(([text, lp]) =>
    `<tr class="${text === t.text ? "chosen" : ""}"><td>${escapeHtml(JSON.stringify(text))}</td>` +
    `<td class="num">${(Math.exp(lp) * 100).toFixed(1)}%</td></tr>`).join("");
  tip.innerHTML = `<div>${escapeHtml(JSON.stringify(t.text))}: ${(Math.exp(t.logprob) * 100).toFixed(1)}%` +
                  ` (id ${t.id})</div><table>${rows}</table><div>Enter or click: look inside</div>`;
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  tip.style.left = `${window.scrollX + r.left}px`;
  tip.style.top = `${window.scrollY + r.bottom + 6}px`;
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function showGenerationSql(body) {
  const r = await fetch("/api/sql", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) return;
  const sql = await r.json();
  showSql("The completion: settings bound with set_config (a batch that gathers other requests adds their " +
          "prompts and seeds), then sql/generate.sql, read through a cursor a row per token.", sql);
}

function showSql(note, sql) {
  $("sql-note").textContent = note;
  $("sql-settings").textContent = Object.entries(sql.settings)
    .map(([k, v]) => `SELECT set_config('${k}', ${sqlLiteral(v)}, true);`)
    .join("\n");
  $("sql-query").textContent = sql.query;
}

function sqlLiteral(v) {  // as the server binds it: an array in PostgreSQL's text form
  const text = Array.isArray(v)
    ? "{" + v.map((x) => '"' + String(x).replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"').join(",") + "}"
    : String(v);
  return "'" + text.replace(/'/g, "''") + "'";
}

// --- inside view ----------------------------------------------------------------------------------------------

async function openInspect(k) {
  document.querySelectorAll(".tok.open").forEach((s) => s.classList.remove("open"));
  const span = document.querySelector(`.tok[data-k="${k}"]`);
  span.classList.add("open");
  state.open = k;
  const t = state.tokens[k];
  const panel = $("inspect");
  panel.hidden = false;
  $("inspect-title").textContent = `Before token ${k + 1}, ${JSON.stringify(t.text)} ` +
                                   `(${(Math.exp(t.logprob) * 100).toFixed(1)}%)`;
  $("inspect-note").textContent =
    "computing: the query's inspect variant runs on the prompt and the tokens before it…";
  $("lens").textContent = "";
  $("heatmaps").textContent = "";
  const body = { model: state.model, prompt: state.prompt, tokens: state.tokens.slice(0, k).map((x) => x.id) };
  const started = performance.now();
  const r = await fetch("/api/inspect", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (state.open !== k) return;
  if (!r.ok) { $("inspect-note").textContent = await errorText(r); return; }
  const data = await r.json();
  $("inspect-note").textContent = `${data.tokens.length} positions (the text tokenized again), ` +
    `${data.attention.length} layers × ${data.attention[0].length} heads, computed in ` +
    `${((performance.now() - started) / 1000).toFixed(2)} s by the query's inspect variant.`;
  renderLens(data);
  renderHeatmaps(data);
  showSql("The inside view: settings, then the inspect variant (gpt-sql sql inspect).", data.sql);
  panel.scrollIntoView({ block: "nearest" });
}

function closeInspect() {
  $("inspect").hidden = true;
  state.open = null;
  document.querySelectorAll(".tok.open").forEach((s) => s.classList.remove("open"));
}

function renderLens(data) {
  const table = $("lens");
  const n = data.tokens.length;
  const first = Math.max(0, n - 12);  // the last positions; the table scrolls for the rest
  const head = document.createElement("tr");
  head.innerHTML = "<th>after block</th>" + data.tokens.slice(first).map((t) =>
    `<th>${escapeHtml(JSON.stringify(t.text))}</th>`).join("");
  table.append(head);
  data.lens.forEach((row, layer) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<th>${layer}</th>` + row.slice(first).map((c, j) =>
      `<td class="tok${first + j === n - 1 ? " last" : ""}${c.prob > 0.55 ? " dark" : ""}" style="--p:${c.prob}" ` +
      `title="${(c.prob * 100).toFixed(1)}%">${escapeHtml(JSON.stringify(c.text))}</td>`).join("");
    table.append(tr);
  });
}

function heat(w, top) {  // white to dark blue; the layer's largest weight darkest
  const a = Math.max(0, Math.min(1, w / top));
  const mix = (from, to) => Math.round(from + (to - from) * a);
  return `rgb(${mix(255, 16)}, ${mix(255, 60)}, ${mix(255, 130)})`;
}

function renderHeatmaps(data) {
  const holder = $("heatmaps");
  const n = data.tokens.length;
  const cell = Math.max(4, Math.min(28, Math.floor(320 / n)));
  const rowH = 16, labelH = cell >= 9 ? 76 : 0, left = 28;
  data.attention.forEach((heads, layer) => {
    const fig = document.createElement("figure");
    fig.className = "layer";
    const cap = document.createElement("figcaption");
    const top = Math.max(1e-9, ...heads.flat());
    cap.textContent = `layer ${layer}: heads (rows) over tokens (columns); darkest ${(top * 100).toFixed(0)}%`;
    const canvas = document.createElement("canvas");
    canvas.width = left + n * cell;
    canvas.height = heads.length * rowH + labelH;
    canvas.tabIndex = 0;
    canvas.setAttribute("role", "img");
    const strongest = heads.map((w, h) => {
      const j = w.indexOf(Math.max(...w));
      return `head ${h}: ${JSON.stringify(data.tokens[j].text)} ${(w[j] * 100).toFixed(0)}%`;
    });
    canvas.setAttribute("aria-label", `layer ${layer} attention; strongest: ${strongest.join("; ")}`);
    const g = canvas.getContext("2d");
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#5f6670";
    heads.forEach((weights, h) => {
      g.fillStyle = "#5f6670";
      g.fillText(`h${h}`, 2, h * rowH + 12);
      weights.forEach((w, j) => {
        g.fillStyle = heat(w, top);
        g.fillRect(left + j * cell, h * rowH, cell, rowH);
      });
    });
    if (labelH) {
      g.fillStyle = "#1d2125";
      data.tokens.forEach((t, j) => {
        g.save();
        g.translate(left + j * cell + cell / 2 - 4, heads.length * rowH + 4);
        g.rotate(Math.PI / 2);
        g.fillText(JSON.stringify(t.text).slice(0, 12), 0, 0);
        g.restore();
      });
    }
    canvas.addEventListener("mousemove", (e) => {
      const r = canvas.getBoundingClientRect();
      const x = (e.clientX - r.left) * canvas.width / r.width, y = (e.clientY - r.top) * canvas.height / r.height;
      const j = Math.floor((x - left) / cell), h = Math.floor(y / rowH);
      if (j >= 0 && j < n && h >= 0 && h < heads.length) {
        $("heat-readout").textContent = `layer ${layer}, head ${h}: ${(heads[h][j] * 100).toFixed(1)}% of its ` +
          `attention on token ${j} ${JSON.stringify(data.tokens[j].text)}`;
      }
    });
    canvas.addEventListener("focus", () => { $("heat-readout").textContent = canvas.getAttribute("aria-label"); });
    fig.append(cap, canvas);
    holder.append(fig);
  });
}

// --- wiring ---------------------------------------------------------------------------------------------------

$("generate").addEventListener("click", generate);
$("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
$("key").addEventListener("change", () => { sessionStorage.setItem("gpt-sql-key", $("key").value); loadModels(); });
$("inspect-close").addEventListener("click", closeInspect);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") { closeInspect(); $("tooltip").hidden = true; }
});
const output = $("output");
output.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTooltip(e.target); });
output.addEventListener("mouseout", (e) => { if (e.target.classList.contains("tok")) $("tooltip").hidden = true; });
output.addEventListener("focusin", (e) => { if (e.target.classList.contains("tok")) showTooltip(e.target); });
output.addEventListener("focusout", () => { $("tooltip").hidden = true; });
output.addEventListener("click", (e) => {
  if (e.target.classList.contains("tok")) openInspect(Number(e.target.dataset.k));
});
output.addEventListener("keydown", (e) => {
  if (e.target.classList.contains("tok") && (e.key === "Enter" || e.key === " ")) {
    e.preventDefault();
    openInspect(Number(e.target.dataset.k));
  }
});
loadModels();
