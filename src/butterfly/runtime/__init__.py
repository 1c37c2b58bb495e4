"""Model families, stage loading and forward, KV cache, sampling: no networking."""
