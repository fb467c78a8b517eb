"""Provider gateway: one AsyncOpenAI client per credential, error mapping, retries; the simulator."""
