"""Stage orchestration: each stage is `run(cfg, ...)` over the previous stage's fingerprinted artifact."""
