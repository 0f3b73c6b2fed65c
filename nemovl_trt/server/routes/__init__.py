"""The frontend's routers, one per endpoint family (chat, completions, models + metadata, health + metrics)."""
