"""Chapter 7: instruction tuning (data, prompts, finetune, responses, judge)."""
