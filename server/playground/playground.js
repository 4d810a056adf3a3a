// The alignd playground: one page, no build step, no network beyond this gateway.
// The method panels are generated from the `Alignment` schema in /openapi.json, so a new method appears here
// without front-end work; the views read what each method reports in `choices[i].alignment`.

const KEY_STORAGE = "alignd-api-key";
const $ = (selector) => document.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

// --- The gateway, with the API key when there is one -----------------------------------------------------

class Unauthorized extends Error {}

async function gateway(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    throw new Unauthorized(body.error?.message || "This gateway needs an API key.");
  }
  return response;
}

function askForKey(message) {
  $("#key-form").hidden = false;
  $("#key-message").textContent = message;
}

// --- Method panels from the schema -------------------------------------------------------------------------

function resolve(schema, spec) {
  if (schema.$ref) return resolve(spec.components.schemas[schema.$ref.split("/").pop()], spec);
  return schema;
}

// A field's schema without its `null` alternative (an optional field), and whether it had one.
function unwrap(schema, spec) {
  const options = schema.anyOf || [schema];
  const present = options.filter((option) => option.type !== "null");
  const optional = present.length < options.length;
  if (present.length === 1) return { schema: resolve(present[0], spec), optional };
  return { schema: { anyOf: present.map((option) => resolve(option, spec)) }, optional };
}

function fieldKind(schema) {
  if (schema.enum) return "enum";
  if (schema.type === "object") return "object";
  if (schema.anyOf) return schema.anyOf.some((option) => option.type === "array") ? "list" : "text";
  return schema.type || "text";
}

function fieldId(path) {
  return `f-${path.join("-")}`;
}

function renderField(path, name, schema, required, spec) {
  const { schema: inner, optional } = unwrap(schema, spec);
  const kind = fieldKind(inner);
  const id = fieldId([...path, name]);
  const description = schema.description || inner.description || "";
  if (kind === "object") return renderParams([...path, name], inner, spec, { nested: true, description });
  let input;
  if (kind === "enum") {
    input = element("select", { id });
    for (const value of inner.enum) input.append(element("option", { value, text: value }));
    if (schema.default !== undefined) input.value = schema.default;
  } else if (kind === "boolean") {
    input = element("input", { id, type: "checkbox" });
    input.checked = Boolean(schema.default);
  } else if (kind === "integer" || kind === "number") {
    input = element("input", {
      id, type: "number", min: inner.minimum ?? inner.exclusiveMinimum, max: inner.maximum ?? inner.exclusiveMaximum,
      step: kind === "integer" ? "1" : "any",
    });
    if (schema.default !== undefined && schema.default !== null) input.value = schema.default;
  } else {
    input = element("input", { id, type: "text", placeholder: kind === "list" ? "one name, or several, comma-separated" : "" });
    if (typeof schema.default === "string") input.value = schema.default;
  }
  input.dataset.kind = kind;
  input.dataset.name = name;
  if (optional || !required) input.dataset.optional = "true";
  const bounds = [inner.minimum ?? inner.exclusiveMinimum, inner.maximum ?? inner.exclusiveMaximum];
  const range = bounds.some((bound) => bound !== undefined) ? ` [${bounds.map((b) => b ?? "").join(", ")}]` : "";
  return element("div", { class: "field" },
    element("label", { for: id, text: `${name}${required ? " *" : ""}${range}` }),
    input,
    description ? element("p", { class: "help", text: description }) : null,
    element("p", { class: "field-error", id: `${id}-error` }));
}

function renderParams(path, schema, spec, { nested = false, description = "" } = {}) {
  const id = fieldId(path);
  const enable = element("input", { type: "checkbox", id: `${id}-on`, class: "method-toggle" });
  const panel = element("details", { class: nested ? "params nested" : "params method", id });
  panel.dataset.path = path.join(".");
  const title = path[path.length - 1];
  panel.append(element("summary", {}, enable, element("span", { class: "method-name", text: ` ${title}` }),
    description ? element("span", { class: "help", text: ` — ${description}` }) : null));
  const required = new Set(schema.required || []);
  for (const [name, field] of Object.entries(schema.properties || {})) {
    panel.append(renderField(path, name, field, required.has(name), spec));
  }
  panel.append(element("p", { class: "field-error", id: `${id}-error` }));
  enable.addEventListener("change", () => { if (enable.checked) panel.open = true; });
  return panel;
}

function renderMethods(spec) {
  const alignment = spec.components.schemas.Alignment;
  const container = $("#methods");
  for (const [name, schema] of Object.entries(alignment.properties)) {
    const { schema: params } = unwrap(schema, spec);
    if (params.type !== "object") continue; // options such as return_details, not methods
    // "``alignment.nudging``: where the base is unsure, ..." -> "where the base is unsure, ..."
    const description = (params.description || "").replace(/^``[^`]*``:?\s*/, "").replace(/``/g, "");
    container.append(renderParams([name], params, spec, { description }));
  }
}

function readValue(input) {
  const raw = input.value.trim();
  switch (input.dataset.kind) {
    case "boolean": return input.checked;
    case "integer": return raw === "" ? undefined : Number.parseInt(raw, 10);
    case "number": return raw === "" ? undefined : Number(raw);
    case "list": return raw.includes(",") ? raw.split(",").map((part) => part.trim()).filter(Boolean) : raw || undefined;
    default: return raw === "" ? undefined : raw;
  }
}

function readParams(panel) {
  const params = {};
  for (const child of panel.children) {
    if (child.matches("details.params")) {
      if (child.querySelector(":scope > summary > .method-toggle").checked) {
        params[child.dataset.path.split(".").pop()] = readParams(child);
      }
      continue;
    }
    const input = child.querySelector?.("input[data-kind], select[data-kind]");
    if (!input) continue;
    const value = readValue(input);
    if (value !== undefined) params[input.dataset.name] = value;
  }
  return params;
}

function readAlignment() {
  const alignment = {};
  for (const panel of document.querySelectorAll("#methods > details.method")) {
    if (panel.querySelector(":scope > summary > .method-toggle").checked) alignment[panel.dataset.path] = readParams(panel);
  }
  return alignment;
}

// --- Requests ----------------------------------------------------------------------------------------------

function requestBody(model, alignment) {
  const endpoint = $("#f-endpoint").value;
  const body = {
    model,
    max_tokens: Number.parseInt($("#f-max_tokens").value, 10) || undefined,
    temperature: Number($("#f-temperature").value || 0),
    stream: true,
    stream_options: { include_usage: true },
    alignment: { ...alignment, return_details: true },
  };
  const seed = $("#f-seed").value.trim();
  if (seed !== "") body.seed = Number.parseInt(seed, 10);
  const prompt = $("#f-prompt").value;
  if (endpoint === "chat") {
    body.messages = [{ role: "user", content: prompt }];
    if ($("#f-logprobs").checked) Object.assign(body, { logprobs: true, top_logprobs: 1 });
  } else {
    body.prompt = prompt;
    if ($("#f-logprobs").checked) body.logprobs = 1;
  }
  return { path: endpoint === "chat" ? "/v1/chat/completions" : "/v1/completions", body };
}

// Reads an SSE stream of chunks into choices (text, token probabilities, details) and the usage.
async function collect(response, started, onUpdate) {
  const result = { choices: [], usage: null, firstTokenMs: null, error: null };
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { result.error = chunk.error; continue; }
      if (chunk.usage) result.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const into = (result.choices[choice.index] ||= { text: "", tokens: [], details: null, finish: null });
        const text = choice.delta ? choice.delta.content || "" : choice.text || "";
        if (text && result.firstTokenMs === null) result.firstTokenMs = performance.now() - started;
        into.text += text;
        into.tokens.push(...tokenProbabilities(choice.logprobs));
        if (choice.alignment) into.details = choice.alignment;
        if (choice.finish_reason) into.finish = choice.finish_reason;
      }
      onUpdate(result);
    }
  }
  result.totalMs = performance.now() - started;
  return result;
}

// Each token with the probability of the top-1 choice at its position (OpenAI's chat and completions shapes).
function tokenProbabilities(logprobs) {
  if (!logprobs) return [];
  if (logprobs.content) {
    return logprobs.content.map((entry) => ({
      token: entry.token, p: Math.exp((entry.top_logprobs?.[0] ?? entry).logprob),
    }));
  }
  return (logprobs.tokens || []).map((token, i) => {
    const top = logprobs.top_logprobs?.[i];
    const best = top ? Math.max(...Object.values(top)) : logprobs.token_logprobs[i];
    return { token, p: Math.exp(best) };
  });
}

async function send(model, alignment, card) {
  const { path, body } = requestBody(model, alignment);
  const started = performance.now(); // a stream's 200 comes with its first event: time from the request
  const response = await gateway(path, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) {
    const error = (await response.json().catch(() => ({}))).error || { message: `HTTP ${response.status}` };
    return { error, status: response.status };
  }
  return collect(response, started, (partial) => card.update(partial));
}

// --- Views of the details ----------------------------------------------------------------------------------

function answerView(choice, heatMap) {
  const nudging = choice.details?.nudging;
  const view = element("p", { class: "answer" });
  if (heatMap && choice.tokens.length) {
    for (const { token, p } of choice.tokens) {
      // Unsure tokens (low top-1 p) red, sure ones clear.
      view.append(element("span", {
        class: "token", text: token, title: `top-1 p = ${p.toFixed(3)}`,
        style: `background: rgba(220, 38, 38, ${(1 - p).toFixed(3)})`,
      }));
    }
    view.classList.add("heat");
  } else if (nudging) {
    for (const span of nudging.spans) {
      const byNudger = span.source === nudging.nudger;
      const where = span.base_p1 === null ? "" : `; the base's top-1 p where it handed over: ${span.base_p1.toFixed(3)}`;
      const node = element("span", {
        class: `span ${byNudger ? "by-nudger" : "by-base"}`, text: span.text, title: `written by ${span.source}${where}`,
      });
      node.dataset.source = span.source;
      view.append(node);
    }
  } else {
    view.textContent = choice.text;
  }
  return view;
}

function nudgingView(details) {
  return element("div", { class: "details nudging" },
    element("h4", { text: "nudging" }),
    element("p", {},
      element("span", { class: "span by-nudger", text: details.nudger }), " wrote ",
      element("strong", { class: "nudged-fraction", text: `${(100 * details.nudged_token_fraction).toFixed(1)}%` }),
      " of the tokens, ", element("span", { class: "span by-base", text: "the base" }), ` the rest; ${details.rounds} nudges, `
      + `stopped by ${details.stopped_by}.`));
}

function bestOfNView(details) {
  const scorers = Object.keys(details.candidates[0]?.rewards || {});
  const table = element("table", { class: "candidates" },
    element("thead", {}, element("tr", {}, ...["#", "reward", ...scorers, "text"].map((h) => element("th", { text: h })))));
  const body = element("tbody");
  for (const candidate of details.candidates) {
    const row = element("tr", { class: candidate.index === details.chosen ? "chosen" : "" },
      element("td", { text: candidate.index }),
      element("td", { class: "reward", text: candidate.reward.toFixed(3) }),
      ...scorers.map((name) => element("td", { text: candidate.rewards[name].toFixed(3) })),
      element("td", { text: candidate.text + (candidate.truncated ? "…" : "") }));
    row.dataset.index = candidate.index;
    body.append(row);
  }
  table.append(body);
  return element("div", { class: "details best-of-n" },
    element("h4", { text: `best-of-${details.n}: select ${details.select}, chose #${details.chosen}` }), table);
}

function bar(fraction, label, kind) {
  return element("span", { class: `bar ${kind}`, title: label },
    element("span", { class: "fill", style: `width: ${(100 * Math.max(0, Math.min(1, fraction))).toFixed(1)}%` }),
    element("span", { class: "bar-label", text: label }));
}

function guidedView(method, details) {
  const view = element("div", { class: `details guided ${method}` },
    element("h4", { text: `${method}: ${details.decision_steps} decision steps, log-ratio ${details.log_ratio.toFixed(3)}` }),
    element("p", { class: "help", text: "Per step: the base's probability of each candidate and the method's value (Q̂ or the ARM's log-probability, scaled within the step); ✓ marks the choice." }));
  details.steps.forEach((step, index) => {
    const values = step.candidates.map((candidate) => candidate.q);
    const low = Math.min(...values);
    const span = Math.max(...values) - low || 1;
    const rows = step.candidates.map((candidate, i) => element("tr", { class: i === step.chosen ? "chosen" : "" },
      element("td", { text: i === step.chosen ? "✓" : "" }),
      element("td", { class: "token-text", text: JSON.stringify(candidate.text) }),
      element("td", {}, bar(Math.exp(candidate.logprob), `p ${Math.exp(candidate.logprob).toFixed(3)}`, "probability")),
      element("td", {}, bar((candidate.q - low) / span, `q ${candidate.q.toFixed(3)}`, "value"))));
    view.append(element("table", { class: "step" }, element("caption", { text: `step ${index + 1}` }), element("tbody", {}, ...rows)));
  });
  if (details.truncated) view.append(element("p", { class: "help", text: "Later steps are not reported." }));
  return view;
}

function grammarView(details) {
  const facts = [`${details.mode} (${details.syntax})`, details.complete ? "complete" : "cut off before the grammar's end"];
  if (details.trie_nodes !== null) facts.push(`trie: ${details.trie_nodes} nodes, learned P(L) ≤ ${details.root_efg?.toPrecision(3)}`);
  return element("div", { class: "details grammar" }, element("h4", { text: "grammar" }),
    element("p", { class: details.complete ? "ok" : "warn", text: facts.join("; ") }));
}

function guidelinesView(details) {
  return element("div", { class: "details guidelines" },
    element("h4", { text: `guidelines from ${details.library}${details.fallback ? " (fallback)" : ""}` }),
    element("ul", {}, ...details.guidelines.map((g) => element("li", {},
      element("strong", { text: g.title }), ` (${g.category})`,
      g.score === null ? "" : ` similarity ${g.score.toFixed(3)}`))));
}

function genericView(method, details) {
  return element("div", { class: `details ${method}` }, element("h4", { text: method }),
    element("pre", { text: JSON.stringify(details, null, 2) }));
}

const VIEWS = {
  nudging: nudgingView, best_of_n: bestOfNView, grammar: grammarView, guidelines: guidelinesView,
  transfer_q: (details) => guidedView("transfer_q", details), genarm: (details) => guidedView("genarm", details),
};

function stats(result) {
  const usage = result.usage || {};
  const parts = [];
  if (result.totalMs !== undefined) parts.push(`${result.totalMs.toFixed(0)} ms`);
  if (result.firstTokenMs !== null && result.firstTokenMs !== undefined) parts.push(`first token ${result.firstTokenMs.toFixed(0)} ms`);
  if (usage.total_tokens !== undefined) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  if (usage.alignment) parts.push(`${usage.alignment.engine_calls} engine calls`);
  if (usage.alignment?.reward_calls) parts.push(`${usage.alignment.reward_calls} reward calls`);
  return parts.join(" · ");
}

class ResultCard {
  constructor(title) {
    this.node = element("article", { class: "result" }, element("h3", { text: title }));
    this.body = element("div");
    this.node.append(this.body);
    this.heatMap = false;
  }

  update(result) {
    this.result = result;
    this.body.replaceChildren();
    if (result.error && !result.choices?.length) {
      this.body.append(element("p", { class: "field-error request-error", text: result.error.message }));
      return;
    }
    this.body.append(element("p", { class: "stats", text: stats(result) }));
    if (result.choices.some((choice) => choice.tokens.length)) {
      const toggle = element("input", { type: "checkbox", class: "heat-toggle" });
      toggle.checked = this.heatMap;
      toggle.addEventListener("change", () => { this.heatMap = toggle.checked; this.update(this.result); });
      this.body.append(element("label", { class: "inline" }, toggle, " uncertainty heat map (top-1 probability)"));
    }
    for (const choice of result.choices) {
      this.body.append(answerView(choice, this.heatMap));
      for (const [method, details] of Object.entries(choice.details || {})) {
        this.body.append((VIEWS[method] || ((d) => genericView(method, d)))(details));
      }
    }
    if (result.error) this.body.append(element("p", { class: "field-error request-error", text: result.error.message }));
  }
}

// --- Errors next to the field the server names -------------------------------------------------------------

function clearErrors() {
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
}

function showError(error) {
  const param = error.param || "";
  const parts = param.split(".");
  if (parts[0] === "alignment") parts.shift();
  // The deepest element the parameter names: a field, else its method's panel, else the form.
  for (let length = parts.length; length > 0; length -= 1) {
    const target = document.getElementById(`${fieldId(parts.slice(0, length))}-error`);
    if (target) {
      target.textContent = error.message;
      target.closest("details")?.setAttribute("open", "");
      return;
    }
  }
  const field = { messages: "f-prompt", prompt: "f-prompt", model: "f-model" }[param];
  if (field) {
    $(`#${field}`).insertAdjacentElement("afterend", element("p", { class: "field-error", text: error.message }));
    return;
  }
  $("#form-error").textContent = error.message;
}

// --- The page ----------------------------------------------------------------------------------------------

let profiles = {};

async function load() {
  let models;
  let spec;
  try {
    [models, spec] = await Promise.all([
      gateway("/v1/models").then((r) => r.json()),
      gateway("/openapi.json").then((r) => r.json()),
    ]);
  } catch (error) {
    if (error instanceof Unauthorized) { askForKey(error.message); return; }
    throw error;
  }
  $("#key-form").hidden = !sessionStorage.getItem(KEY_STORAGE);
  const select = $("#f-model");
  select.replaceChildren();
  profiles = {};
  for (const card of models.data) {
    if (card.root) profiles[card.id] = card.root;
    select.append(element("option", { value: card.id, text: card.root ? `${card.id} (profile on ${card.root})` : card.id }));
  }
  select.onchange = noteModel;
  noteModel();
  document.querySelectorAll("#methods > details").forEach((panel) => panel.remove());
  renderMethods(spec);
  document.body.dataset.ready = "true";
}

function noteModel() {
  const model = $("#f-model").value;
  $("#model-note").textContent = profiles[model]
    ? `A profile: ${profiles[model]} with the profile's methods. "Plain" in the comparison is ${profiles[model]} alone.`
    : "";
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const model = $("#f-model").value;
  const alignment = readAlignment();
  const results = $("#results");
  results.replaceChildren();
  const runs = [];
  runs.push({ title: `aligned: ${model}`, model, alignment, fields: true });
  if ($("#f-compare").checked) {
    runs.unshift({ title: `plain: ${profiles[model] || model}`, model: profiles[model] || model, alignment: {} });
  }
  results.classList.toggle("compare", runs.length > 1);
  const cards = runs.map((run) => new ResultCard(run.title));
  results.append(...cards.map((card) => card.node));
  $("#send").disabled = true;
  try {
    const outcomes = await Promise.all(runs.map((run, i) => send(run.model, run.alignment, cards[i])));
    outcomes.forEach((outcome, i) => {
      if (outcome.status && runs[i].fields) showError(outcome.error); // the plain run's errors stay in its card
      cards[i].update(outcome.status ? { error: outcome.error, choices: [] } : outcome);
    });
  } catch (error) {
    if (error instanceof Unauthorized) askForKey(error.message);
    else $("#form-error").textContent = String(error);
  } finally {
    $("#send").disabled = false;
    results.dataset.done = String(Number(results.dataset.done || 0) + 1);
  }
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("#api-key").value.trim());
  $("#api-key").value = "";
  $("#key-message").textContent = "";
  load();
});
$("#request-form").addEventListener("submit", submit);
load();
