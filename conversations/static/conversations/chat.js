/* The built-in chat page: speaks the /ws/chat/ protocol (DESIGN.md) over one WebSocket. */
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    assistant: $("assistant"),
    newConversation: $("new-conversation"),
    notice: $("notice"),
    log: $("log"),
    composer: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    connection: $("connection"),
    usage: $("usage"),
  };
  const MAX_RETRY_MS = 15000;
  const UNAUTHORIZED_CLOSE = 4401;

  const state = {
    socket: null,
    conversationId: conversationFromHash(),
    generating: false,
    bubbles: new Map(), // message_id -> {root, text, tools}
    tools: new Map(), // call_id -> {line, label}
    pending: new Map(), // client_msg_id -> {root, content}
    retryMs: 1000,
    retryTimer: null,
  };

  // --- connection ----------------------------------------------------------------------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // The tenant the page was rendered for (the view already validated ?tenant=), so the
    // socket and the page always agree.
    const tenant = document.body.dataset.tenant || new URLSearchParams(location.search).get("tenant");
    const query = tenant ? "?tenant=" + encodeURIComponent(tenant) : "";
    return scheme + "//" + location.host + "/ws/chat/" + query;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    const socket = new WebSocket(socketUrl());
    state.socket = socket;
    setConnection("Connecting…", "");
    socket.onopen = () => {
      state.retryMs = 1000;
      setConnection("Connected", "online");
      if (state.conversationId) {
        // A generation outlives its socket: joining again resumes the stream.
        send({ type: "conversation.join", conversation_id: state.conversationId });
      } else if (state.generating) {
        // Dropped before the server told us the new conversation's id: nothing to rejoin.
        failPending("The connection dropped before the conversation started.");
      }
      updateControls();
    };
    socket.onmessage = (event) => {
      if (socket === state.socket) handle(JSON.parse(event.data));
    };
    socket.onclose = (event) => {
      if (socket !== state.socket) return; // replaced on purpose
      state.socket = null;
      updateControls();
      if (event.code === UNAUTHORIZED_CLOSE) {
        setConnection("Not signed in — reload the page", "offline");
        return;
      }
      const delay = state.retryMs;
      state.retryMs = Math.min(delay * 2, MAX_RETRY_MS);
      setConnection("Disconnected — reconnecting in " + delay / 1000 + "s", "offline");
      state.retryTimer = setTimeout(connect, delay);
    };
  }

  function reconnectNow() {
    // A fresh socket drops the old conversation's subscription, so its events stop arriving.
    const old = state.socket;
    state.socket = null;
    if (old) old.close();
    connect();
  }

  function send(frame) {
    if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return false;
    state.socket.send(JSON.stringify(frame));
    return true;
  }

  // --- server events -------------------------------------------------------------------

  const handlers = {
    conversation(event) {
      setConversation(event.id);
    },
    "message.accepted"(event) {
      const sent = state.pending.get(event.client_msg_id);
      if (sent) sent.root.classList.remove("pending");
      state.pending.delete(event.client_msg_id);
    },
    "message.started"(event) {
      const bubble = assistantBubble(event.message_id);
      bubble.root.title = event.model || "";
      setGenerating(true);
    },
    delta(event) {
      const bubble = state.bubbles.get(event.message_id);
      if (!bubble) return;
      bubble.text.append(event.content); // a Text node: never parsed as HTML
      scrollDown();
    },
    "tool.call"(event) {
      const bubble = state.bubbles.get(event.message_id) || assistantBubble(event.message_id);
      let args = JSON.stringify(event.arguments || {});
      if (args.length > 80) args = args.slice(0, 77) + "…";
      const label = "🔧 " + event.name + "(" + args + ") → ";
      const line = element("div", "tool", label + "…");
      bubble.tools.append(line);
      state.tools.set(event.call_id, { line, label });
    },
    "tool.result"(event) {
      const tool = state.tools.get(event.call_id);
      if (!tool) return;
      tool.line.textContent = tool.label + (event.ok ? "ok" : "failed");
      tool.line.classList.toggle("failed", !event.ok);
    },
    "message.completed"(event) {
      finishBubble(event.message_id, null);
      const usage = event.usage || {};
      els.usage.textContent =
        (usage.prompt_tokens || 0) + " prompt + " + (usage.completion_tokens || 0) +
        " completion tokens · $" + event.cost_usd;
      setGenerating(false);
    },
    "conversation.state"(event) {
      if (event.conversation_id !== state.conversationId) return;
      if (event.generating && event.message_id) {
        // The partial answer so far replaces whatever this page had streamed before the drop.
        assistantBubble(event.message_id).text.textContent = event.content || "";
        setGenerating(true);
        scrollDown();
        return;
      }
      for (const [id, bubble] of state.bubbles) {
        if (bubble.root.classList.contains("streaming")) {
          finishBubble(id, "The rest of this answer was generated while disconnected.");
        }
      }
      setGenerating(false);
    },
    error(event) {
      let text = event.message || event.code;
      if (event.retry_after) text += " (retry in " + Math.ceil(event.retry_after) + "s)";
      showNotice(text);
      if (event.message_id) {
        finishBubble(event.message_id, "Incomplete: " + (event.code || "error"));
      } else if (event.client_msg_id && state.pending.has(event.client_msg_id)) {
        failPending("Not sent: " + (event.code || "error"), event.client_msg_id);
      }
      if (event.code === "not_found" && state.conversationId) setConversation(null);
      // The only frames sent while generating are joins and cancels; any error means this
      // page is no longer waiting for an answer.
      setGenerating(false);
    },
  };

  function handle(event) {
    const handler = handlers[event.type];
    if (handler) handler(event);
  }

  // --- log -----------------------------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function userBubble(content) {
    const root = element("div", "msg user pending");
    root.append(element("div", "text", content));
    els.log.append(root);
    scrollDown(true);
    return root;
  }

  function assistantBubble(messageId) {
    let bubble = state.bubbles.get(messageId);
    if (bubble) return bubble;
    const root = element("div", "msg assistant streaming");
    const tools = element("div", "tools");
    const text = element("div", "text");
    root.append(tools, text);
    els.log.append(root);
    bubble = { root, text, tools };
    state.bubbles.set(messageId, bubble);
    scrollDown(true);
    return bubble;
  }

  function finishBubble(messageId, note) {
    const bubble = state.bubbles.get(messageId);
    if (!bubble) return;
    bubble.root.classList.remove("streaming");
    if (note) {
      bubble.root.classList.add("incomplete");
      bubble.root.append(element("div", "note", note));
    }
  }

  function failPending(note, clientMsgId) {
    for (const [id, sent] of state.pending) {
      if (clientMsgId && id !== clientMsgId) continue;
      sent.root.classList.remove("pending");
      sent.root.classList.add("incomplete");
      sent.root.append(element("div", "note", note));
      if (!els.input.value) els.input.value = sent.content; // give the text back
      state.pending.delete(id);
    }
    setGenerating(false);
  }

  function scrollDown(force) {
    const log = els.log;
    if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
  }

  // --- page state ----------------------------------------------------------------------

  function conversationFromHash() {
    const match = /(?:^#|&)c=([0-9a-f-]{36})(?:&|$)/i.exec(location.hash);
    return match ? match[1] : null;
  }

  function setConversation(id) {
    state.conversationId = id;
    const base = location.pathname + location.search;
    history.replaceState(null, "", id ? base + "#c=" + id : base);
    updateControls();
  }

  function setGenerating(on) {
    state.generating = on;
    updateControls();
  }

  function setConnection(text, className) {
    els.connection.textContent = text;
    els.connection.className = className;
  }

  function showNotice(text) {
    els.notice.textContent = text;
    els.notice.hidden = !text;
  }

  function updateControls() {
    const open = !!state.socket && state.socket.readyState === WebSocket.OPEN;
    els.send.disabled = !open || state.generating;
    els.stop.hidden = !(state.generating && state.conversationId);
    els.stop.disabled = !open;
    // The assistant is fixed when a conversation is created.
    els.assistant.disabled = !!state.conversationId;
  }

  function randomId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // --- user actions --------------------------------------------------------------------

  function submit(event) {
    event.preventDefault();
    const content = els.input.value;
    if (!content.trim() || state.generating) return;
    const clientMsgId = randomId();
    const sent = send({
      type: "message.create",
      conversation_id: state.conversationId,
      assistant: els.assistant.value || null,
      content: content,
      client_msg_id: clientMsgId,
    });
    if (!sent) return showNotice("Not connected — the message was not sent.");
    showNotice("");
    state.pending.set(clientMsgId, { root: userBubble(content), content });
    els.input.value = "";
    setGenerating(true);
  }

  function newConversation() {
    setConversation(null);
    state.bubbles.clear();
    state.tools.clear();
    state.pending.clear();
    els.log.replaceChildren();
    els.usage.textContent = "";
    showNotice("");
    setGenerating(false);
    reconnectNow();
    els.input.focus();
  }

  els.composer.addEventListener("submit", submit);
  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => {
    if (state.conversationId) send({ type: "generation.cancel", conversation_id: state.conversationId });
  });
  els.newConversation.addEventListener("click", newConversation);

  updateControls();
  connect();
})();
