"""Test helpers: a fake OpenAI-compatible server that reports exact usage (no network, no key)."""
