"""Training: data pipeline (data, tokenizer, loader), loop, optimizer and schedules, checkpoints,
distributed set-up and metric loggers. Entry point: trainers.loop.train."""
