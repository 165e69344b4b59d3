from runs import small_shards, small_vae  # noqa: F401  (session fixtures shared with tests/distributed)
