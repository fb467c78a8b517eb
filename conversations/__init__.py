"""Assistants, conversations and messages; the chat engine and its WebSocket/REST surfaces."""
