// The chat page of `srt serve` (served at /): a multi-turn chat with the served model.
// Talks to the server's own OpenAI API: GET v1/models for the model list, POST
// v1/chat/completions with stream=true for each answer (server-sent events, with
// stream_options.include_usage for the token counts). URLs are relative, so the page also works
// behind a proxy that mounts the server under a path. Settings live in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"),
  system: $("system"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  settings: $("settings"),
  toggleSettings: $("toggle-settings"),
  newChat: $("new-chat"),
  messages: $("messages"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
};
// Inputs kept across visits: element -> localStorage key.
const STORED = [
  [els.system, "srt-chat.system"],
  [els.temperature, "srt-chat.temperature"],
  [els.maxTokens, "srt-chat.max-tokens"],
  [els.apiKey, "srt-chat.api-key"],
];

// The conversation sent with each request ({role, content}; the system prompt is added then).
let history = [];
// The AbortController of the answer being streamed; null when idle.
let controller = null;

function storage(key, value) {
  // NOTE: localStorage throws when the browser disallows it (private modes, file policies);
  // the page then works without remembering.
  try {
    if (value === undefined) return localStorage.getItem(key);
    localStorage.setItem(key, value);
  } catch (e) {
    return null;
  }
  return null;
}

function authHeaders() {
  const key = els.apiKey.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

// The message of a failed response: srt's OpenAI-style body {"object": "error", "message"},
// OpenAI's {"error": {"message"}}, or the raw text.
async function responseError(resp) {
  const text = await resp.text();
  let message = text;
  try {
    const body = JSON.parse(text);
    message = body.message || (body.error && body.error.message) || body.detail || text;
  } catch (e) {
    // not JSON: the text as it came
  }
  if (typeof message !== "string") message = JSON.stringify(message);
  if (resp.status === 401) message += " (enter the server's key under Settings)";
  return `HTTP ${resp.status}: ${message}`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  div.appendChild(body);
  els.messages.appendChild(div);
  scrollDown();
  return div;
}

function addNote(msg, className, text) {
  const note = document.createElement("div");
  note.className = className;
  note.textContent = text;
  if (className === "error") note.setAttribute("role", "alert");
  msg.appendChild(note);
  scrollDown();
}

function showError(text) {
  const msg = addMessage("system-error", "");
  addNote(msg, "error", text);
}

function scrollDown() {
  els.messages.scrollTop = els.messages.scrollHeight;
}

function setBusy(busy) {
  els.send.textContent = busy ? "Stop" : "Send";
  els.send.classList.toggle("stop", busy);
}

async function loadModels() {
  els.model.replaceChildren();
  let resp;
  try {
    resp = await fetch("v1/models", { headers: authHeaders() });
  } catch (e) {
    showError("cannot reach the server: " + e.message);
    return;
  }
  if (!resp.ok) {
    showError(await responseError(resp));
    if (resp.status === 401) openSettings(true);
    return;
  }
  // The server answers now: errors of earlier tries (a missing key) no longer hold.
  for (const old of els.messages.querySelectorAll(".msg.system-error")) old.remove();
  const list = await resp.json();
  for (const card of list.data || []) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = card.id;
    els.model.appendChild(opt);
  }
}

// Yields the data of each server-sent event of a fetch response body.
async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const lines = event.split(/\r?\n/).filter((l) => l.startsWith("data:"));
      if (lines.length) yield lines.map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    }
    if (done) return;
  }
}

function requestBody(turns) {
  const messages = [];
  const system = els.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (els.model.value) body.model = els.model.value;
  // NOTE: an empty field leaves the server's default; anything else goes as typed, so the
  // server's own validation answers a bad value (shown as an error).
  if (els.temperature.value.trim() !== "") body.temperature = Number(els.temperature.value);
  if (els.maxTokens.value.trim() !== "") body.max_tokens = Number(els.maxTokens.value);
  return body;
}

function stats(usage, finish, t0, tFirst, tEnd) {
  const secs = (tEnd - t0) / 1000;
  const parts = [];
  if (usage) {
    const n = usage.completion_tokens;
    parts.push(`${n} tokens in ${secs.toFixed(2)} s`);
    parts.push(`${(n / secs).toFixed(1)} tok/s`);
    parts.push(`prompt ${usage.prompt_tokens} tokens`);
  } else {
    parts.push(`${secs.toFixed(2)} s`);
  }
  if (tFirst !== null) parts.push(`first token after ${((tFirst - t0) / 1000).toFixed(2)} s`);
  if (finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

async function send() {
  const text = els.prompt.value.trim();
  if (!text || controller) return;
  els.prompt.value = "";
  // NOTE: this turn's own reference: "New chat" during the answer starts a fresh array, and
  // whatever this turn adds after that lands in the old one.
  const turns = history;
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant", "");
  const out = msg.querySelector(".body");
  const ctl = new AbortController();
  controller = ctl;
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null;
  let content = "";
  let usage = null;
  let finish = null;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(requestBody(turns)),
      signal: ctl.signal,
    });
    if (!resp.ok) throw new Error(await responseError(resp));
    for await (const data of sseData(resp)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (tFirst === null) tFirst = performance.now();
          content += delta;
          out.textContent = content;
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    turns.push({ role: "assistant", content });
    addNote(msg, "stats", stats(usage, finish, t0, tFirst, performance.now()));
  } catch (e) {
    if (e.name === "AbortError") {
      // What came before the stop stays part of the conversation.
      turns.push({ role: "assistant", content });
      addNote(msg, "stats", "stopped · " + stats(null, null, t0, tFirst, performance.now()));
    } else {
      // The turn failed: it leaves the conversation, and the text returns to the input box.
      turns.pop();
      if (!content) out.remove();
      addNote(msg, "error", e.message);
      if (!els.prompt.value) els.prompt.value = text;
    }
  } finally {
    controller = null;
    setBusy(false);
    els.prompt.focus();
  }
}

function openSettings(open) {
  els.settings.hidden = !open;
  els.toggleSettings.setAttribute("aria-expanded", String(open));
  if (open && !els.apiKey.value) els.apiKey.focus();
}

function init() {
  for (const [el, key] of STORED) {
    const saved = storage(key);
    if (saved !== null) el.value = saved;
    el.addEventListener("change", () => storage(key, el.value));
  }
  els.apiKey.addEventListener("change", loadModels);
  els.toggleSettings.addEventListener("click", () => openSettings(els.settings.hidden));
  els.newChat.addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    els.messages.replaceChildren();
  });
  els.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    if (controller) controller.abort();
    else send();
  });
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (!controller) els.composer.requestSubmit();
    }
  });
  loadModels();
  els.prompt.focus();
}

init();
