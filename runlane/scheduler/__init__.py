"""The scheduler: cron timing (pure) and the firing loop every worker runs (exactly once per fire)."""
