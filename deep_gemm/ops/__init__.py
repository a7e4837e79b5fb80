"""The host pipelines of the public functions: validation, launch caching, custom ops, casts, padding."""
