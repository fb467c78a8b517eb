/* The member page's glue: the chat itself is <parley-chat> (/embed.js); the page's assistant
   picker only says which assistant a new conversation starts with. */
"use strict";

(function () {
  const select = document.getElementById("assistant");
  const chat = document.getElementById("chat");
  if (!select || !chat) return;
  select.addEventListener("change", () => chat.setAttribute("assistant", select.value));
})();
