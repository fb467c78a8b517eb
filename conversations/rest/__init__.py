"""The REST surface of conversations: DRF views, serializers, the JSON parser and SSE streaming."""
