/* <parley-chat>: Parley's one chat UI, for the member page (session cookie, same origin) and for
   tenants' own sites (an end-user token, from an allowed origin). Speaks the /ws/chat/ protocol
   (README "WebSocket protocol"). Served inside /embed.js, which defines `vendor` (markdown-it,
   DOMPurify) in the enclosing function; nothing here touches the host page's globals but the
   custom element's name. */

const MAX_CHARS = 32000;
const MAX_RETRY_MS = 15000;
const UNAUTHORIZED_CLOSE = 4401;
const PAGE = 30;
const SAFE_URL = /^(?:https?:|mailto:)/i;
const LIST_ACTION = "parley-chat:list"; // the client_msg_id of renames and deletes: their errors touch no turn

const STYLE = `
:host {
  --parley-font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  --parley-text: #1f2328; --parley-muted: #656d76; --parley-bg: #f6f7f9; --parley-surface: #fff;
  --parley-border: #d0d7de; --parley-accent: #0b62d6; --parley-accent-text: #fff;
  --parley-user-bg: #dbeafe; --parley-user-text: var(--parley-text);
  --parley-assistant-bg: #f1f3f5; --parley-error: #a4161a; --parley-radius: 8px;
  --parley-height: 100%;
  display: block; height: var(--parley-height); min-height: 24rem; min-width: 0;
  font: var(--parley-font); color: var(--parley-text);
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
button, select, textarea, input { font: inherit; color: inherit; }
button {
  padding: .3rem .75rem; border: 1px solid var(--parley-border); border-radius: 6px;
  background: var(--parley-surface); cursor: pointer; white-space: nowrap;
}
button:disabled { opacity: .5; cursor: default; }
button.primary { background: var(--parley-accent); border-color: var(--parley-accent); color: var(--parley-accent-text); }
button.link { border: 0; background: none; padding: .1rem .3rem; color: var(--parley-accent); }
.root {
  display: flex; height: 100%; min-height: 0; gap: .75rem; background: var(--parley-bg);
  padding: .75rem; border-radius: var(--parley-radius); overflow: hidden;
}
.side {
  flex: 0 0 15rem; display: flex; flex-direction: column; gap: .5rem; min-height: 0; min-width: 0;
  background: var(--parley-surface); border: 1px solid var(--parley-border); border-radius: var(--parley-radius); padding: .5rem;
}
.side h2 { margin: 0; font-size: .95rem; }
.side ul { list-style: none; margin: 0; padding: 0; overflow-y: auto; flex: 1; }
.side li { display: flex; align-items: center; gap: .15rem; border-radius: 6px; }
.side li.current { background: var(--parley-assistant-bg); }
.side li .open { flex: 1; min-width: 0; text-align: left; border: 0; background: none; overflow: hidden; text-overflow: ellipsis; }
.side li input { flex: 1; min-width: 0; }
.main { flex: 1; display: flex; flex-direction: column; min-width: 0; min-height: 0; gap: .5rem; }
.top { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; }
.top .spacer { flex: 1; }
.badge { font-size: .8rem; padding: .1rem .5rem; border-radius: 999px; background: #fff4d6; border: 1px solid #e9c46a; }
.notice {
  padding: .45rem .7rem; border-radius: 6px; background: #fdecea; border: 1px solid #f5c2bd;
  color: var(--parley-error); overflow-wrap: anywhere;
}
.log {
  flex: 1; overflow-y: auto; overflow-x: hidden; min-height: 8rem; padding: .6rem;
  background: var(--parley-surface); border: 1px solid var(--parley-border); border-radius: var(--parley-radius);
}
.empty { color: var(--parley-muted); }
.msg { margin: .45rem 0; padding: .5rem .75rem; border-radius: var(--parley-radius); max-width: 88%; overflow-wrap: anywhere; }
.msg.user { margin-left: auto; background: var(--parley-user-bg); color: var(--parley-user-text); white-space: pre-wrap; }
.msg.user.pending { opacity: .6; }
.msg.assistant { background: var(--parley-assistant-bg); }
.msg.assistant.streaming .text::after { content: "▍"; color: var(--parley-muted); }
.msg.incomplete { border-left: 3px solid var(--parley-error); }
.msg .text > :first-child { margin-top: 0; }
.msg .text > :last-child { margin-bottom: 0; }
.msg pre { position: relative; overflow-x: auto; background: #0d1117; color: #e6edf3; padding: .6rem; border-radius: 6px; }
.msg code { font: .88em/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }
.msg pre .copy { position: absolute; top: .3rem; right: .3rem; font-size: .75rem; padding: .05rem .45rem; }
.msg table { border-collapse: collapse; display: block; overflow-x: auto; }
.msg td, .msg th { border: 1px solid var(--parley-border); padding: .2rem .4rem; }
.msg img { max-width: 100%; }
.msg a { color: var(--parley-accent); }
.meta, .note, .tool { font-size: .78rem; color: var(--parley-muted); margin-top: .25rem; }
.note { color: var(--parley-error); }
.tool { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.tool.failed { color: var(--parley-error); }
form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: flex-end; }
textarea {
  flex: 1 1 14rem; min-width: 0; resize: none; max-height: 40vh; padding: .45rem .6rem;
  border: 1px solid var(--parley-border); border-radius: 6px; background: var(--parley-surface);
}
.buttons { display: flex; gap: .4rem; flex-wrap: wrap; }
.status { display: flex; flex-wrap: wrap; justify-content: space-between; gap: .25rem 1rem; font-size: .8rem; color: var(--parley-muted); }
.status .online { color: #1a7f37; } .status .offline { color: var(--parley-error); }
@media (max-width: 720px) {
  .root { flex-direction: column; padding: .5rem; }
  .side { flex: 0 0 auto; max-height: 12rem; }
  .side.collapsed ul, .side.collapsed .more { display: none; }
  .msg { max-width: 100%; }
}
@media (min-width: 721px) { .toggle { display: none; } }
`;

const TEMPLATE = `
<div class="root" part="root">
  <nav class="side collapsed" aria-label="Conversations">
    <div class="top"><h2>Conversations</h2><span class="spacer"></span>
      <button type="button" class="toggle link" aria-expanded="false">Show</button></div>
    <button type="button" class="new">New conversation</button>
    <ul class="list"></ul>
    <button type="button" class="more link" hidden>Older conversations</button>
  </nav>
  <section class="main">
    <div class="top">
      <span class="title"></span><span class="spacer"></span>
      <span class="badge" hidden title="Answers come from Parley's built-in simulator, not a real model">Simulated model</span>
    </div>
    <div class="notice" role="alert" hidden></div>
    <div class="log" role="log" aria-live="polite" aria-label="Transcript">
      <button type="button" class="earlier link" hidden>Earlier messages</button>
      <p class="empty">Start the conversation below.</p>
    </div>
    <form class="composer">
      <textarea rows="1" aria-label="Message" maxlength="${MAX_CHARS}"
        placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
      <div class="buttons">
        <button type="submit" class="primary send">Send</button>
        <button type="button" class="stop" hidden>Stop</button>
        <button type="button" class="retry" hidden>Retry</button>
      </div>
    </form>
    <div class="status">
      <span class="connection">Connecting…</span>
      <span class="count">0 / ${MAX_CHARS.toLocaleString("en")}</span>
      <span class="total"></span>
    </div>
  </section>
</div>`;

function markdownRenderer() {
  const md = vendor.markdownit({ html: false, linkify: true, breaks: true });
  md.validateLink = (url) => SAFE_URL.test(url.trim()); // anything else stays plain text
  const purify = vendor.DOMPurify(window);
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
  const options = { ALLOWED_URI_REGEXP: SAFE_URL, FORBID_TAGS: ["style", "form", "input", "button"], RETURN_DOM_FRAGMENT: true };
  return (text) => purify.sanitize(md.render(text), options);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function randomId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function tokenUser(token) {
  // The token's payload (Django signing: base64url JSON before the first ':'); read, not trusted.
  try {
    const part = token.split(":")[0].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).u || "";
  } catch (error) {
    return "";
  }
}

function money(value) {
  return "$" + Number(value || 0).toFixed(6).replace(/0{1,4}$/, "");
}

class ParleyChat extends HTMLElement {
  static get observedAttributes() {
    return ["token", "assistant", "server"];
  }

  constructor() {
    super();
    this.attachShadow({ mode: "open" });
    const style = element("style");
    style.textContent = STYLE;
    const holder = element("template");
    holder.innerHTML = TEMPLATE; // our own constant markup, no data in it
    this.shadowRoot.append(style, holder.content.cloneNode(true));
    const q = (selector) => this.shadowRoot.querySelector(selector);
    this.els = {
      side: q(".side"), toggle: q(".toggle"), newButton: q(".new"), list: q(".list"), more: q(".more"),
      title: q(".title"), badge: q(".badge"), notice: q(".notice"), log: q(".log"), earlier: q(".earlier"),
      empty: q(".empty"), form: q(".composer"), input: q("textarea"), send: q(".send"), stop: q(".stop"),
      retry: q(".retry"), connection: q(".connection"), count: q(".count"), total: q(".total"),
    };
    this.render = markdownRenderer();
    this.socket = null;
    this.retryMs = 1000;
    this.reset();
    this.bindEvents();
  }

  connectedCallback() {
    this.conversationId = this.getAttribute("conversation") || this.remembered() || null;
    this.connected = true;
    this.loadConfig();
    this.connect();
  }

  disconnectedCallback() {
    this.connected = false;
    clearTimeout(this.retryTimer);
    if (this.socket) {
      const old = this.socket;
      this.socket = null;
      old.close();
    }
  }

  attributeChangedCallback(name, old, value) {
    if (!this.connected || old === value) return;
    if (name === "token" || name === "server") {
      this.showNotice("");
      this.loadConfig();
      this.reconnectNow(true);
    }
  }

  // --- where and who ---------------------------------------------------------------------

  get server() {
    return (this.getAttribute("server") || location.origin).replace(/\/+$/, "");
  }

  get token() {
    return this.getAttribute("token") || "";
  }

  storageKey() {
    const who = this.token ? "u:" + tokenUser(this.token) : "m:" + (this.getAttribute("user") || "") + "@" + (this.getAttribute("tenant") || "");
    return "parley-chat:" + this.server + ":" + who;
  }

  remembered() {
    try {
      return localStorage.getItem(this.storageKey());
    } catch (error) {
      return null; // storage disabled (a sandboxed iframe): nothing is remembered
    }
  }

  remember(id) {
    try {
      if (id) localStorage.setItem(this.storageKey(), id);
      else localStorage.removeItem(this.storageKey());
    } catch (error) {
      /* storage disabled */
    }
  }

  query() {
    const params = new URLSearchParams();
    if (this.token) params.set("token", this.token);
    else if (this.getAttribute("tenant")) params.set("tenant", this.getAttribute("tenant"));
    return params.toString();
  }

  async loadConfig() {
    try {
      const response = await fetch(this.server + "/embed/config?" + this.query(), { credentials: "same-origin" });
      this.config = response.ok ? await response.json() : null;
    } catch (error) {
      this.config = null;
    }
    this.els.badge.hidden = !(this.config && this.config.simulator);
    if (this.config && !this.config.origin_allowed) this.refusedOrigin();
  }

  refusedOrigin() {
    this.showNotice("This website (" + location.origin + ") is not allowed to open this chat: the site's owner must add it to the tenant's allowed origins.");
    this.setConnection("Refused by the server", "offline");
  }

  // --- connection ------------------------------------------------------------------------

  connect() {
    clearTimeout(this.retryTimer);
    if (!this.connected) return;
    const base = this.server.replace(/^http/, "ws");
    const socket = new WebSocket(base + "/ws/chat/?" + this.query());
    this.socket = socket;
    let opened = false;
    this.setConnection("Connecting…", "");
    socket.onopen = () => {
      opened = true;
      this.retryMs = 1000;
      this.setConnection("Connected", "online");
      this.send({ type: "conversations.list", before: null, limit: PAGE });
      if (this.conversationId) this.resume();
      else if (this.generating) this.failPending("The connection dropped before the conversation started.");
      this.updateControls();
    };
    socket.onmessage = (event) => {
      if (socket === this.socket) this.handle(JSON.parse(event.data));
    };
    socket.onclose = (event) => {
      if (socket !== this.socket) return; // replaced on purpose
      this.socket = null;
      this.updateControls();
      if (event.code === UNAUTHORIZED_CLOSE) return this.unauthorized();
      if (!opened && this.config && !this.config.origin_allowed) return this.refusedOrigin();
      if (!opened && this.token && !this.config) this.loadConfig(); // learn why, for the next try
      const delay = this.retryMs;
      this.retryMs = Math.min(delay * 2, MAX_RETRY_MS);
      this.setConnection("Disconnected — reconnecting in " + delay / 1000 + "s", "offline");
      this.retryTimer = setTimeout(() => this.connect(), delay);
    };
  }

  unauthorized() {
    if (!this.token) return this.setConnection("Not signed in — reload the page", "offline");
    this.setConnection("Signing in again…", "offline");
    // The host page answers by setting a fresh `token` attribute, which reconnects.
    this.dispatchEvent(new CustomEvent("token-expired", { bubbles: true, composed: true, detail: { server: this.server } }));
  }

  resume() {
    if (this.lastOffset && this.transcriptOf === this.conversationId) {
      // Back after a drop: every event after the last one seen, exactly once.
      this.send({ type: "conversation.join", conversation_id: this.conversationId, after: this.lastOffset });
      return;
    }
    this.clearLog();
    this.transcriptOf = this.conversationId;
    this.send({ type: "conversation.read", conversation_id: this.conversationId, before: null, limit: PAGE });
    this.send({ type: "conversation.join", conversation_id: this.conversationId });
  }

  reconnectNow(force) {
    // A fresh socket drops the old conversation's subscription, so its events stop arriving.
    const old = this.socket;
    this.socket = null;
    if (old) old.close();
    if (force) this.retryMs = 1000;
    this.connect();
  }

  send(frame) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  // --- server events ---------------------------------------------------------------------

  handle(event) {
    if (event.offset) this.lastOffset = event.offset;
    const handler = this.handlers[event.type];
    if (handler) handler.call(this, event);
  }

  get handlers() {
    return {
      conversation(event) {
        this.setConversation(event.id);
        this.transcriptOf = event.id;
      },
      "message.accepted"(event) {
        const sent = this.pending.get(event.client_msg_id);
        if (sent) {
          sent.root.classList.remove("pending");
          this.pending.delete(event.client_msg_id);
        } else if (!this.userShown.has(event.message_id) && this.conversationId) {
          // Another tab's question: read it back so this tab shows it above the answer.
          this.questionReads += 1;
          this.send({ type: "conversation.read", conversation_id: this.conversationId, before: null, limit: 1 });
        }
        this.userShown.add(event.message_id);
      },
      "message.started"(event) {
        const bubble = this.assistantBubble(event.message_id);
        bubble.model = event.model || "";
        this.setGenerating(true);
      },
      delta(event) {
        const bubble = this.bubbles.get(event.message_id) || this.assistantBubble(event.message_id);
        bubble.content += event.content;
        this.renderLater(bubble);
      },
      "tool.call"(event) {
        const bubble = this.bubbles.get(event.message_id) || this.assistantBubble(event.message_id);
        let args = JSON.stringify(event.arguments || {});
        if (args.length > 80) args = args.slice(0, 77) + "…";
        const label = "🔧 " + event.name + "(" + args + ") → ";
        const line = element("div", "tool", label + "…");
        bubble.tools.append(line);
        this.tools.set(event.call_id, { line, label });
      },
      "tool.result"(event) {
        const tool = this.tools.get(event.call_id);
        if (!tool) return;
        tool.line.textContent = tool.label + (event.ok ? "ok" : "failed");
        tool.line.classList.toggle("failed", !event.ok);
      },
      "message.completed"(event) {
        this.finishBubble(event.message_id, null, event);
        this.setGenerating(false);
        this.lastFailed = null;
        this.send({ type: "conversations.list", before: null, limit: PAGE }); // titles, order
      },
      "conversation.state"(event) {
        if (event.conversation_id !== this.conversationId) return;
        if (event.generating && event.message_id) {
          const bubble = this.assistantBubble(event.message_id);
          if (event.content !== undefined) bubble.content = event.content || ""; // the partial answer so far
          this.renderNow(bubble);
          this.setGenerating(true);
          return;
        }
        for (const [id, bubble] of this.bubbles) {
          if (bubble.root.classList.contains("streaming")) this.finishBubble(id, "The rest of this answer was generated while disconnected.");
        }
        this.setGenerating(false);
      },
      conversations(event) {
        this.showConversations(event);
      },
      "conversation.messages"(event) {
        if (event.conversation_id === this.conversationId) this.showMessages(event);
      },
      "conversation.renamed"(event) {
        const item = this.listItems.get(event.conversation_id);
        if (item) item.open.textContent = event.title || "Untitled";
        if (event.conversation_id === this.conversationId) this.els.title.textContent = event.title || "";
      },
      "conversation.deleted"(event) {
        const item = this.listItems.get(event.conversation_id);
        if (item) item.li.remove();
        this.listItems.delete(event.conversation_id);
        if (event.conversation_id === this.conversationId) this.newConversation();
      },
      error(event) {
        if (event.code === "unauthorized") return; // the close (4401) that follows says it
        if (event.client_msg_id === LIST_ACTION) return this.showNotice(event.message || event.code); // a rename or delete
        let text = event.message || event.code;
        if (event.retry_after) text += " (retry in " + Math.ceil(event.retry_after) + "s)";
        this.showNotice(text);
        if (event.message_id) {
          this.finishBubble(event.message_id, event.code === "cancelled" ? "Stopped." : "Incomplete: " + (event.code || "error"));
        } else if (event.client_msg_id && this.pending.has(event.client_msg_id)) {
          this.failPending("Not sent: " + (event.code || "error"), event.client_msg_id);
        }
        if (event.code !== "cancelled" && this.lastSent && (event.message_id || event.client_msg_id)) this.lastFailed = this.lastSent;
        if (event.code === "not_found" && this.conversationId && !event.client_msg_id) this.newConversation();
        this.setGenerating(false);
      },
    };
  }

  // --- history ---------------------------------------------------------------------------

  showConversations(event) {
    if (!this.listAppending) {
      this.els.list.replaceChildren();
      this.listItems.clear();
    }
    this.listAppending = false;
    for (const item of event.items || []) this.els.list.append(this.conversationItem(item));
    this.listNext = event.next || null;
    this.els.more.hidden = !this.listNext;
    this.markCurrent();
  }

  conversationItem(item) {
    const li = element("li");
    const open = element("button", "open", item.title || "Untitled");
    open.type = "button";
    open.title = (item.assistant || "") + (item.updated_at ? " · " + new Date(item.updated_at).toLocaleString() : "");
    open.addEventListener("click", () => this.openConversation(item.id));
    const rename = element("button", "link", "Rename");
    rename.type = "button";
    rename.setAttribute("aria-label", "Rename " + (item.title || "Untitled"));
    rename.addEventListener("click", () => this.startRename(item.id, li, open));
    const remove = element("button", "link", "Delete");
    remove.type = "button";
    remove.setAttribute("aria-label", "Delete " + (item.title || "Untitled"));
    remove.addEventListener("click", () => {
      if (remove.dataset.armed) return this.send({ type: "conversation.delete", conversation_id: item.id, client_msg_id: LIST_ACTION });
      remove.dataset.armed = "1";
      remove.textContent = "Confirm";
      setTimeout(() => { delete remove.dataset.armed; remove.textContent = "Delete"; }, 4000);
    });
    li.append(open, rename, remove);
    this.listItems.set(item.id, { li, open, title: item.title || "" });
    return li;
  }

  startRename(id, li, open) {
    const input = element("input");
    input.value = open.textContent === "Untitled" ? "" : open.textContent;
    input.setAttribute("aria-label", "New title");
    input.maxLength = 200;
    open.hidden = true;
    li.prepend(input);
    input.focus();
    const finish = (save) => {
      if (!input.isConnected) return;
      if (save && input.value.trim()) this.send({ type: "conversation.rename", conversation_id: id, title: input.value.trim(), client_msg_id: LIST_ACTION });
      input.remove();
      open.hidden = false;
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  markCurrent() {
    for (const [id, item] of this.listItems) item.li.classList.toggle("current", id === this.conversationId);
    const current = this.listItems.get(this.conversationId);
    this.els.title.textContent = current ? current.title : "";
  }

  showMessages(event) {
    // Newest first, a page of them: shown above what is already there (each message once).
    const messages = (event.messages || []).slice().reverse().filter((m) => !this.shownIds.has(m.id));
    if (this.questionReads > 0) {
      this.questionReads -= 1;
      for (const message of messages) if (message.role === "user") this.insertQuestion(this.userMessage(message));
    } else {
      const first = this.firstMessage();
      for (const message of messages) {
        const node = message.role === "user" ? this.userMessage(message) : this.storedAnswer(message);
        if (node) this.els.log.insertBefore(node, first); // null: at the end
      }
      this.transcriptNext = event.next || null;
      this.els.earlier.hidden = !this.transcriptNext;
      if (!this.scrolledOnce) {
        this.scrolledOnce = true;
        this.scrollDown(true);
      }
    }
    this.updateEmpty();
    this.updateTotal();
  }

  insertQuestion(node) {
    // A question from another tab goes right above its answer when that already streams.
    const streaming = [...this.bubbles.values()].find((b) => b.root.classList.contains("streaming"));
    if (streaming) this.els.log.insertBefore(node, streaming.root);
    else this.els.log.append(node);
  }

  firstMessage() {
    return this.els.log.querySelector(".msg");
  }

  userMessage(message) {
    this.shownIds.add(message.id);
    this.userShown.add(message.id);
    const root = element("div", "msg user", message.content);
    root.dataset.id = message.id;
    return root;
  }

  storedAnswer(message) {
    if (message.role !== "assistant" || this.bubbles.has(message.id)) return null;
    this.shownIds.add(message.id);
    const bubble = this.newBubble(message.id);
    bubble.content = message.content || "";
    bubble.model = message.model || "";
    for (const call of message.tool_calls || []) {
      const fn = call.function || call;
      bubble.tools.append(element("div", "tool", "🔧 " + (fn.name || "tool") + "(" + (typeof fn.arguments === "string" ? fn.arguments : JSON.stringify(fn.arguments || {})).slice(0, 80) + ")"));
    }
    this.renderNow(bubble);
    const note = message.status && message.status !== "complete" ? message.status : null;
    this.finishBubble(message.id, note, { usage: message.usage, cost_usd: message.cost_usd, cached: message.cached });
    return bubble.root;
  }

  // --- the transcript --------------------------------------------------------------------

  newBubble(messageId) {
    const root = element("div", "msg assistant streaming");
    root.dataset.id = messageId;
    const tools = element("div", "tools");
    const text = element("div", "text");
    root.append(tools, text);
    const bubble = { root, text, tools, content: "", model: "", frame: 0, cost: 0 };
    this.bubbles.set(messageId, bubble);
    return bubble;
  }

  assistantBubble(messageId) {
    let bubble = this.bubbles.get(messageId);
    if (bubble) return bubble;
    bubble = this.newBubble(messageId);
    this.shownIds.add(messageId);
    this.els.log.append(bubble.root);
    this.updateEmpty();
    this.scrollDown(true);
    return bubble;
  }

  renderLater(bubble) {
    if (bubble.frame) return;
    bubble.frame = requestAnimationFrame(() => this.renderNow(bubble));
  }

  renderNow(bubble) {
    if (bubble.frame) cancelAnimationFrame(bubble.frame);
    bubble.frame = 0;
    bubble.text.replaceChildren(this.render(bubble.content)); // sanitised: no raw HTML, only http(s)/mailto links
    for (const pre of bubble.text.querySelectorAll("pre")) {
      const copy = element("button", "copy", "Copy");
      copy.type = "button";
      copy.setAttribute("aria-label", "Copy code");
      copy.addEventListener("click", () => this.copyCode(pre, copy));
      pre.append(copy);
    }
    this.scrollDown();
  }

  async copyCode(pre, button) {
    const code = pre.querySelector("code");
    try {
      await navigator.clipboard.writeText((code || pre).textContent);
      button.textContent = "Copied";
    } catch (error) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  finishBubble(messageId, note, completed) {
    const bubble = this.bubbles.get(messageId);
    if (!bubble) return;
    if (bubble.frame) this.renderNow(bubble);
    bubble.root.classList.remove("streaming");
    if (note) {
      bubble.root.classList.add("incomplete");
      bubble.root.append(element("div", "note", note));
    }
    if (completed && (completed.usage || completed.cost_usd !== undefined)) {
      const usage = completed.usage || {};
      const parts = [];
      if (bubble.model) parts.push(bubble.model);
      parts.push((usage.prompt_tokens || 0) + " prompt + " + (usage.completion_tokens || 0) + " completion tokens");
      if (completed.cost_usd !== undefined && completed.cost_usd !== null) parts.push(money(completed.cost_usd));
      if (completed.cached) parts.push("cached");
      const meta = element("div", "meta", parts.join(" · "));
      bubble.root.append(meta);
      bubble.cost = Number(completed.cost_usd || 0);
      bubble.tokens = (usage.prompt_tokens || 0) + (usage.completion_tokens || 0);
      this.updateTotal();
    }
  }

  failPending(note, clientMsgId) {
    for (const [id, sent] of this.pending) {
      if (clientMsgId && id !== clientMsgId) continue;
      sent.root.classList.remove("pending");
      sent.root.classList.add("incomplete");
      sent.root.append(element("div", "note", note));
      this.pending.delete(id);
    }
    this.setGenerating(false);
  }

  clearLog() {
    for (const node of [...this.els.log.querySelectorAll(".msg")]) node.remove();
    this.bubbles.clear();
    this.tools.clear();
    this.pending.clear();
    this.shownIds.clear();
    this.userShown.clear();
    this.transcriptNext = null;
    this.questionReads = 0;
    this.scrolledOnce = false;
    this.els.earlier.hidden = true;
    this.updateEmpty();
    this.updateTotal();
  }

  updateEmpty() {
    this.els.empty.hidden = !!this.firstMessage();
  }

  updateTotal() {
    let cost = 0;
    let tokens = 0;
    for (const bubble of this.bubbles.values()) {
      cost += bubble.cost || 0;
      tokens += bubble.tokens || 0;
    }
    this.els.total.textContent = tokens ? "Conversation: " + tokens + " tokens · " + money(cost) : "";
  }

  scrollDown(force) {
    const log = this.els.log;
    if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
  }

  // --- state -----------------------------------------------------------------------------

  reset() {
    this.conversationId = null;
    this.generating = false;
    this.bubbles = new Map(); // message_id -> bubble
    this.tools = new Map(); // call_id -> {line, label}
    this.pending = new Map(); // client_msg_id -> {root, content}
    this.shownIds = new Set();
    this.userShown = new Set();
    this.listItems = new Map();
    this.lastOffset = null;
    this.transcriptOf = null;
    this.questionReads = 0;
  }

  setConversation(id) {
    this.conversationId = id;
    this.remember(id);
    this.markCurrent();
    this.updateControls();
  }

  setGenerating(on) {
    this.generating = on;
    this.updateControls();
  }

  setConnection(text, className) {
    this.els.connection.textContent = text;
    this.els.connection.className = "connection " + className;
  }

  showNotice(text) {
    this.els.notice.textContent = text;
    this.els.notice.hidden = !text;
  }

  updateControls() {
    const open = !!this.socket && this.socket.readyState === WebSocket.OPEN;
    this.els.send.disabled = !open || this.generating;
    this.els.stop.hidden = !(this.generating && this.conversationId);
    this.els.stop.disabled = !open;
    this.els.retry.hidden = !this.lastFailed || this.generating;
    this.els.retry.disabled = !open;
  }

  // --- user actions ----------------------------------------------------------------------

  bindEvents() {
    const els = this.els;
    els.form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (this.sendMessage(els.input.value)) {
        els.input.value = "";
        this.grow();
      }
    });
    els.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        els.form.requestSubmit();
      }
    });
    els.input.addEventListener("input", () => this.grow());
    els.stop.addEventListener("click", () => {
      if (this.conversationId) this.send({ type: "generation.cancel", conversation_id: this.conversationId });
    });
    els.retry.addEventListener("click", () => {
      if (this.lastFailed) this.sendMessage(this.lastFailed);
    });
    els.newButton.addEventListener("click", () => this.newConversation());
    els.more.addEventListener("click", () => {
      this.listAppending = true;
      this.send({ type: "conversations.list", before: this.listNext, limit: PAGE });
    });
    els.earlier.addEventListener("click", () => {
      this.send({ type: "conversation.read", conversation_id: this.conversationId, before: this.transcriptNext, limit: PAGE });
    });
    els.toggle.addEventListener("click", () => {
      const collapsed = els.side.classList.toggle("collapsed");
      els.toggle.textContent = collapsed ? "Show" : "Hide";
      els.toggle.setAttribute("aria-expanded", String(!collapsed));
    });
  }

  grow() {
    const input = this.els.input;
    input.style.height = "auto";
    input.style.height = input.scrollHeight + 2 + "px";
    this.els.count.textContent = input.value.length.toLocaleString("en") + " / " + MAX_CHARS.toLocaleString("en");
  }

  sendMessage(content) {
    if (!content.trim() || this.generating) return false;
    const clientMsgId = randomId();
    const sent = this.send({
      type: "message.create",
      conversation_id: this.conversationId,
      assistant: this.conversationId ? null : this.getAttribute("assistant") || null,
      content,
      client_msg_id: clientMsgId,
    });
    if (!sent) {
      this.showNotice("Not connected — the message was not sent.");
      return false;
    }
    this.showNotice("");
    this.lastSent = content;
    this.lastFailed = null;
    const root = element("div", "msg user pending", content);
    this.els.log.append(root);
    this.updateEmpty();
    this.scrollDown(true);
    this.pending.set(clientMsgId, { root, content });
    this.setGenerating(true);
    return true;
  }

  openConversation(id) {
    if (id === this.conversationId) return;
    this.clearLog();
    this.lastFailed = null;
    this.setConversation(id);
    this.transcriptOf = null;
    this.lastOffset = null;
    this.showNotice("");
    this.setGenerating(false);
    this.reconnectNow(true);
  }

  newConversation() {
    this.clearLog();
    this.lastFailed = null;
    this.setConversation(null);
    this.transcriptOf = null;
    this.lastOffset = null;
    this.showNotice("");
    this.setGenerating(false);
    this.reconnectNow(true);
    this.els.input.focus();
  }
}

if (!customElements.get("parley-chat")) customElements.define("parley-chat", ParleyChat);
