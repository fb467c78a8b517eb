"""The OpenAI-compatible proxy (`/v1`): stateless, it stores usage only, no conversation."""
