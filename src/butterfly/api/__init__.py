"""The gateway's HTTP API: the native endpoints and the OpenAI-compatible ones."""
