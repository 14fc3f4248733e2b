// The chat page: keeps the conversation, streams answers from /v1/chat/completions (server-sent
// events), and shows under each answer its token count, tokens/s and time to first token.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"),
  empty: $("empty"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  settings: $("settings"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  system: $("system"),
};
const SETTINGS_KEY = "atb_llm.chat.settings";

const history = []; // {role, content} of the conversation so far
let current = null; // {controller} while an answer streams
let conversation = 0; // bumped by "New chat", so an answer still finishing lands nowhere
let modelName = null;

// ---- settings ----------------------------------------------------------------------------------
function loadSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  if (saved.temperature !== undefined) ui.temperature.value = saved.temperature;
  if (saved.maxTokens !== undefined) ui.maxTokens.value = saved.maxTokens;
  if (saved.system !== undefined) ui.system.value = saved.system;
}

function saveSettings() {
  const settings = { temperature: ui.temperature.value, maxTokens: ui.maxTokens.value, system: ui.system.value };
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

function requestBody() {
  const system = ui.system.value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  return {
    model: modelName,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value),
    max_tokens: Math.round(Number(ui.maxTokens.value)),
  };
}

// ---- rendering ---------------------------------------------------------------------------------
function addMessage(role) {
  ui.empty.hidden = true;
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  el.append(body);
  let stats = null;
  if (role === "assistant") {
    stats = document.createElement("div");
    stats.className = "stats";
    el.append(stats);
  }
  ui.messages.append(el);
  return { el, body, stats };
}

// Plain text, with ``` fenced blocks shown as code. Text nodes only: model output is never HTML.
function render(body, text) {
  body.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^[^\n]*\n/, ""); // the language tag line
      pre.append(code);
      body.append(pre);
    } else {
      // the line breaks around a fence are the code block's own edges
      let plain = part;
      if (i > 0) plain = plain.replace(/^\n/, "");
      if (i < parts.length - 1) plain = plain.replace(/\n+$/, "");
      if (plain) body.append(document.createTextNode(plain));
    }
  });
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function statsLine(t) {
  const n = t.usage ? t.usage.completion_tokens : t.chunks;
  const parts = [`${t.usage ? "" : "~"}${n} tokens`];
  if (t.first !== null) {
    const decodeS = (t.ended - t.first) / 1000;
    parts.push(n > 1 && decodeS > 0 ? `${((n - 1) / decodeS).toFixed(1)} tokens/s` : "- tokens/s");
    parts.push(`first token ${Math.round(t.first - t.started)} ms`);
  }
  if (t.state === "stopped") parts.push("stopped");
  if (t.finish === "length") parts.push("reached max tokens");
  return parts.join(" · ");
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}

// ---- streaming ---------------------------------------------------------------------------------
async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function ask(question) {
  const thisConversation = conversation;
  history.push({ role: "user", content: question });
  render(addMessage("user").body, question);
  const msg = addMessage("assistant");
  msg.el.dataset.state = "streaming";
  scrollDown();
  const controller = new AbortController();
  current = { controller };
  setBusy(true);
  const t = { started: performance.now(), first: null, ended: null, chunks: 0, usage: null, finish: null, state: "" };
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeader() },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) t.usage = chunk.usage;
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) t.finish = choice.finish_reason;
      if (choice.delta.content) {
        t.first ??= performance.now();
        t.chunks += 1;
        answer += choice.delta.content;
        render(msg.body, answer);
        scrollDown();
      }
    }
    t.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      t.state = "stopped";
    } else {
      t.state = "error";
      msg.el.classList.add("error");
      render(msg.body, answer ? `${answer}\n\n${err.message}` : err.message);
    }
  } finally {
    t.ended = performance.now();
    msg.el.dataset.state = t.state;
    msg.stats.textContent = t.state === "error" && !answer ? "" : statsLine(t);
    if (thisConversation === conversation) {
      if (answer) history.push({ role: "assistant", content: answer });
      else history.pop(); // no answer: forget the question too, so turns keep alternating
    }
    current = null;
    setBusy(false);
    scrollDown();
  }
}

// ---- controls ----------------------------------------------------------------------------------
function stop() {
  if (current) current.controller.abort();
}

function newChat() {
  stop();
  conversation += 1;
  history.length = 0;
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.input.focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.input.value.trim();
  if (!question || current) return;
  ui.input.value = "";
  ask(question);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

ui.stop.addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("settings-toggle").addEventListener("click", (event) => {
  ui.settings.hidden = !ui.settings.hidden;
  event.currentTarget.setAttribute("aria-expanded", String(!ui.settings.hidden));
});
for (const input of [ui.temperature, ui.maxTokens, ui.system]) input.addEventListener("change", saveSettings);

// A server started with --api_key: open the page as /#key=API_KEY (a fragment never reaches the server's logs).
function authHeader() {
  const key = new URLSearchParams(location.hash.slice(1)).get("key");
  return key ? { Authorization: `Bearer ${key}` } : {};
}

loadSettings();
fetch("/v1/models", { headers: authHeader() })
  .then((r) => r.json())
  .then((j) => {
    modelName = j.data[0].id;
    $("model").textContent = modelName;
  })
  .catch(() => {});
ui.input.focus();
