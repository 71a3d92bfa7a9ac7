"""``eval``: exported drafts measured by speculative decoding (hf in-process, or vLLM)."""
