"""An OpenAI-compatible upstream, as a raw ASGI app: deterministic and faultable.

Used as the model in tests, the demo and benchmarks; the real `openai` SDK parses every byte.
``from simulator import create_app, Simulator`` is the entry point; the modules of this
package are small, one concept each (see the end of this docstring).

Endpoints
---------
- ``POST /v1/chat/completions`` (``Authorization: Bearer <non-empty>``): a ``chat.completion``
  object, or with ``stream: true`` a ``text/event-stream`` framed like OpenAI's: a role chunk,
  one content chunk per word (the word with its leading space), a chunk with an empty delta and
  ``finish_reason``, a ``choices: []`` usage chunk only when ``stream_options.include_usage``
  (earlier chunks then carry ``"usage": null``), and ``data: [DONE]``.
- ``POST /v1/moderations`` (bearer required): see Moderation below.
- ``GET /v1/models`` (bearer required): gpt-4o, gpt-4o-mini, gpt-4-turbo, gpt-3.5-turbo.
- ``POST /v1/files``, ``GET /v1/files/{id}[/content]``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]``,
  ``POST /v1/batches/{id}/cancel`` (bearer required): OpenAI's Batch API, in memory; a batch runs
  its lines on the first retrieve (``simulator/batches.py``). ``create_app(batches=False)`` (or
  ``run_simulator --no-batches``) answers 404 there instead, like a server without a Batch API.
- ``GET /sim/stats``, ``POST /sim/reset``, ``GET /sim/requests``, ``GET /sim/moderations`` (no
  auth): the counters, a reset, and the recorded chat / moderation request bodies, for tests
  that run the simulator out of process.
- Anything else: 404 with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

Mounted inside another ASGI app, paths are matched below the scope's ``root_path``.

The reply
---------
Deterministic in the messages: ``You said: <first 8 words of the last user message>. (turn N)``
(N = user messages seen) followed by filler words drawn from a small list with a seed hashed from
all messages (directives stripped), 20 words in all. ``max_tokens`` / ``max_completion_tokens``
keep the longest word prefix whose tiktoken count fits and answer ``finish_reason: "length"``.
``usage.prompt_tokens`` is ``llm.tokens.count_messages``; ``completion_tokens`` is
``count_text`` of the generated text; ``prompt_tokens_details.cached_tokens`` is the prompt
cache's hit (below). Every chat completion response (success or error) carries ``x-request-id``
and the ``x-ratelimit-*`` headers (a per-app token bucket; plausible values).

Timing: the app waits ``ttft_ms``, then sends the headers, the role chunk and the first content
chunk together (as OpenAI does: headers arrive with the first token, so an SDK timeout before
the first token surfaces from ``create()``); later chunks are paced at ``tokens_per_second``
(0 = no delay). A non-streamed answer waits for the whole generation. Only ``asyncio.sleep``.

Validation follows OpenAI where we model it (each a 400 with its error body): the body, model,
roles, ``stream_options`` without ``stream``, ``max_tokens``; ``tools`` (a non-empty list of
``{"type": "function", "function": {"name", …}}``); ``tool_choice`` and
``parallel_tool_calls`` only with ``tools``, a named ``tool_choice`` only of a listed tool; an
assistant's ``tool_calls`` (ids, type, function name and arguments strings); and the pairing
OpenAI enforces: every ``tool`` message answers (``tool_call_id``) a call of the assistant
message just before its run of tool messages ("messages with role 'tool' must be a response to
a preceeding message with 'tool_calls'", param ``messages.[i].role``), and every such call has
its result ("An assistant message with 'tool_calls' must be followed by tool messages
responding to each 'tool_call_id'. …").

Directives
----------
Written in the LAST user message as ``[[sim:KEY=VALUE KEY=VALUE]]`` (several blocks merge); they
are stripped from the echoed text and from the reply seed. A malformed directive is a 400. A
block ends at the first ``]]`` outside JSON strings and brackets, and items split on whitespace
outside them, so a JSON value may hold ``]``, ``]]`` and spaces.

=================  ==========================================================================
``status=S``       answer HTTP S with OpenAI's error body before any byte of the reply
                   (5xx: ``server_error``; 429: ``rate_limit_error`` / ``rate_limit_exceeded``;
                   401: ``invalid_api_key``; other 4xx: ``invalid_request_error``)
``retry_after=T``  with ``status``: ``retry-after`` (seconds) and ``retry-after-ms`` headers
``fail_times=K``   with ``status``: fail only the first K requests with this exact model,
                   messages and directive (the fingerprint), then answer normally
``hang=1``         accept the request, never send headers (sleeps 1 h; cancelled on disconnect)
``hang_after=N``   stream N content chunks, then hang
``cut=N``          stream N content chunks, then drop the connection (no finish, usage, [DONE])
``malformed=N``    after N content chunks send ``data: {this is not json``, end the body
``words=N``        the reply is exactly N words (N content chunks)
``ttft_ms=MS``     per-request time to first token
``tps=R``          per-request chunks per second (0 = unpaced)
``nocache=1``      bypass the prompt cache: no lookup (``cached_tokens`` 0), nothing stored
``tool=A,B``       call these tools, in this order (see Tool calls)
``args=JSON``      their arguments: an object (one tool) or a list of objects aligned with the
                   names (a missing one is ``{}``), e.g. ``args={"expression":"2+2"}``
``bad_args=1``     the FIRST call's arguments are valid JSON but break its schema
``bad_json=1``     the FIRST call's arguments are not JSON at all (the closing brace is missing)
``tool_loop=1``    call the tools of ``tool=`` on every request, even after tool results
=================  ==========================================================================

``ignore_tool_choice=1`` behaves like the many servers that ignore ``tool_choice: "none"``: the
directive's calls are made anyway (with ``tool_loop=1``, on every request).

Chunk counts (``cut``, ``malformed``, ``hang_after``) count the chunks after the role chunk,
whether they carry content or tool-call fragments.

Tool calls
----------
Whether a request is answered with calls (first match wins):

1. ``tool_choice: "none"`` → never; text (unless ``ignore_tool_choice=1``: then rule 3).
2. ``tool_choice`` names a tool X → call X, with the ``args`` the directive gives X when the
   directive asks (below) and names X, else ``{}``.
3. The directive asks: ``tool=`` is present and the LAST message is the user message carrying
   it — or ``tool_loop=1`` is set, then also when tool results follow — → call its tools.
4. The last message is the user's plain question that an offered tool answers (questions.py:
   "what is 17 * 23?", "calculate (2+3)^2" → the tool taking an ``expression``; "what time is
   it in Tokyo?" → the tool taking a ``timezone``, ``{"timezone": "Asia/Tokyo"}``) → call it.
5. ``tool_choice: "required"`` → call the first tool of ``tools`` with ``{}``.
6. Otherwise text. When the last message is a ``tool`` message, the text uses the results:
   ``Tool results: NAME: CONTENT; NAME: CONTENT.`` (the tool messages after the last assistant
   ``tool_calls`` message, in order, each content whitespace-collapsed and cut to 80 chars),
   then filler to 20 words (``words=N`` cuts to exactly N), ``finish_reason: "stop"``.

"required" and a named ``tool_choice`` call on every request, after tool results too, as
OpenAI's do. A called tool that is not among the request's ``tools`` (or no ``tools`` at all)
gives text instead: ``Tool NAME is unavailable. You said: …``. ``parallel_tool_calls: false``
keeps only the first call.

Streamed as OpenAI does: the role chunk carries the first call's header
``{"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_…", "type":
"function", "function": {"name": NAME, "arguments": ""}}], "refusal": null}``; then the
arguments in fragments of up to 8 characters (at least two), each a chunk
``{"tool_calls": [{"index": i, "function": {"arguments": FRAGMENT}}]}``; each later call opens
with its own header chunk (index 1, 2, …); the finish chunk says ``"tool_calls"``. Arguments are
compact JSON. Non-streamed: ``message.content`` is null and ``message.tool_calls`` holds the
whole calls. Completion tokens: each call's name plus each fragment's tiktoken count; a
``max_tokens`` too small keeps the chunks that fit and finishes with ``"length"``.

``bad_args=1``: in the first call's arguments, the first required property of its schema (else
the first declared one with a ``type``) gets the first of ``12345``, ``"not-a-number"``,
``true``, ``null``, ``[]`` that its type refuses (a string gets ``12345``, a number or integer
``"not-a-number"``); a schema without typed properties gets ``"unexpected_argument": true``
added instead. ``bad_json=1`` (applied after ``bad_args``): the text loses its closing brace.

Prompt caching
--------------
As OpenAI documents it: per API key (the bearer token), per model and ``tools`` (the JSON as
sent: reordered tool definitions miss); only prompts of at least 1,024 tokens; a hit is the
longest cached prefix counted in 128-token steps — ``cached_tokens`` ∈ {0, 1024, 1152, 1280,
…}, never above ``prompt_tokens``. The prompt is a token sequence of exactly ``prompt_tokens``
tokens (``llm.tokens.count_messages``'s framing: per message 3 synthetic framing tokens and the
tiktoken encoding of each string field in order, then 3 priming tokens equal to a message's
framing), so a turn's whole prompt is a prefix of the next turn's. Every request (not
``nocache``) looks up its prefixes, then stores them all — the first send of a prompt is a miss,
the second a hit — each entry living ``cache_ttl_s`` (default 300) from its last use.
``usage.prompt_tokens_details.cached_tokens`` reports the hit, streamed (in the usage chunk) or
not. Implementation: ``cache.py`` (a hash per 128-token boundary; O(prompt) per request).

Moderation
----------
``POST /v1/moderations`` with ``input`` a string, a list of strings (one result each) or a list
of ``text`` / ``image_url`` parts (one result), ``model`` default ``omni-moderation-latest``
(echoed). OpenAI's shape: ``{"id": "modr-…", "model", "results": [{"flagged", "categories",
"category_scores", "category_applied_input_types"}]}`` over the 13 omni categories, and, like
OpenAI, no ``usage``. Trigger words (whole words, case-insensitive; a sub-category's trigger
flags its parent too), score 0.99 when flagged, else 0.001. Images are never flagged.

=============================  ==================================
``harass-word``                harassment
``threaten-word``              harassment, harassment/threatening
``hate-word``                  hate
``hatethreat-word``            hate, hate/threatening
``illicit-word``               illicit
``weapon-word``                illicit, illicit/violent
``selfharm-word``              self-harm
``selfharm-intent-word``       self-harm, self-harm/intent
``selfharm-howto-word``        self-harm, self-harm/instructions
``sexual-word``                sexual
``minors-word``                sexual, sexual/minors
``kill``, ``violence-word``    violence
``gore-word``                  violence, violence/graphic
=============================  ==================================

Directives in moderation input are not acted on (it is usually a chat message about to be sent
with them); faults come from ``app.inject_moderation(status=…, retry_after=…, hang=…, times=…)``.

How faults reach the ``openai`` SDK (3.57, httpx2) over uvicorn
-------------------------------------------------------------
``cut`` raises StreamCut from the app after the response started; uvicorn closes the socket
without the terminating chunk (its traceback log is filtered out), and iterating the stream
yields the N deltas, then raises ``openai.APIConnectionError`` (cause: httpx2
``RemoteProtocolError``, incomplete chunked read). Mounted in Parley under Daphne, the same holds
through ``python -m config.daphne`` (``make run``), which closes the connection of an app that
raised after its response started; stock Daphne leaves it open until the client's timeout. ``malformed`` raises ``json.JSONDecodeError``
from the iteration, after the N deltas. ``hang`` ends in ``openai.APITimeoutError`` at the
client's timeout. Non-streamed: ``hang_after`` hangs too, ``cut`` sends half the JSON body then
drops the connection (``APIConnectionError``), and ``malformed`` answers 200 with a non-JSON
body (``json.JSONDecodeError``). Through httpx2's in-process ``ASGITransport`` (which buffers
whole responses) ``cut`` raises StreamCut itself.

Programmatic faults and stats
-----------------------------
``app.inject(status=500, times=1)``, ``app.inject(hang=True)``, ``app.inject(cut=3)``,
``app.inject(tool="calculator", args={"expression": "2+2"})`` … queue faults (the directive keys
as keyword arguments) in ``app.faults``; each valid chat completion request consumes the head of
the queue FIFO, its fields overriding the message's directives. ``app.stats`` counts requests
(every chat completion POST), completions (answered to the end), incomplete (cut, hang,
malformed, client disconnect), errors (4xx/5xx answered to chat completions) and the tokens
served: the full prompt tokens of every reply begun (error answers excluded), their
``cached_tokens``, and the completion tokens of the chunks actually sent (a broken non-streamed
answer delivers none); ``tool_calls`` (calls in completed answers) and ``moderations`` (every
moderation POST, errors included). Each chunk is booked right after it is sent, a completion
before its ``[DONE]``: a client that has read to the end finds the stats final. ``app.requests``
keeps the last 200 valid chat request bodies (injected failures included),
``app.moderation_requests`` the moderation ones. ``app.reset()`` clears faults, stats, failure
counts, recorded requests and the prompt cache.

Modules
-------
``app`` (routing, faults, stats) · ``request`` (parsing, validation) · ``directives`` ·
``plan`` (what the reply says: ``plan_reply`` → ``ReplyPlan``) · ``tools`` (whether and what to
call) · ``cache`` (prompt prefixes) · ``wire`` (rendering and streaming a plan) ·
``moderation`` · ``errors`` · ``asgi`` (plumbing).
"""

from __future__ import annotations

from .app import MODELS, QueuedFault, SimStats, Simulator, create_app, models_body
from .asgi import dumps, send_json, sse
from .cache import CACHE_MIN_TOKENS, CACHE_STEP, PromptCache, prompt_token_sequence
from .directives import Directives, parse_directives, strip_directives
from .errors import ApiError, StreamCut
from .moderation import CATEGORIES, MODERATION_MODEL, TRIGGERS, flagged_categories
from .plan import DEFAULT_WORDS, FILLER, ReplyPlan, compose_words, fit_to_max_tokens, plan_reply
from .request import ROLES, ParsedRequest, message_text, parse_chat_request
from .tools import ToolCall, decide_tools, invalid_arguments
from .wire import Reply, chunk_event, completion_body, usage_event

__all__ = [
    "CACHE_MIN_TOKENS", "CACHE_STEP", "CATEGORIES", "DEFAULT_WORDS", "FILLER", "MODELS",
    "MODERATION_MODEL", "ROLES", "TRIGGERS", "ApiError", "Directives", "ParsedRequest",
    "PromptCache", "QueuedFault", "Reply", "ReplyPlan", "SimStats", "Simulator", "StreamCut",
    "ToolCall", "chunk_event", "completion_body", "compose_words", "create_app", "decide_tools",
    "dumps", "fit_to_max_tokens", "flagged_categories", "invalid_arguments", "message_text",
    "models_body", "parse_chat_request", "parse_directives", "plan_reply",
    "prompt_token_sequence", "send_json", "sse", "strip_directives", "usage_event",
]
