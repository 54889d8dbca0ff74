"""`distill eval`: students against the teacher on held-out prompts (`evaluate.run_eval`): config,
metrics, teacher agreement, report and plots."""
