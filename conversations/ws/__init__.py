"""The WebSocket surface of conversations: routing, the socket's authentication, the consumer."""
