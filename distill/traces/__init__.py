"""`distill generate`: prompts -> teacher -> answer checks and rejection filters -> a checksummed,
resumable shard store of reasoning traces (`generate.run_generate`)."""
