"""The parts of `distill eval` (entry point: `distill.evaluate.run_eval`): config, metrics,
teacher agreement, report."""
