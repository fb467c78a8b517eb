"""The streaming spine: each conversation's event log (a Redis Stream, or process memory when
embedded), the per-process fan-out that reads it for every socket, and what keeps a stream going
while Redis or PostgreSQL restarts. It knows nothing of chat: the chat app appends events and
the surfaces read them from an offset."""
