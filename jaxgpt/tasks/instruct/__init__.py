"""Chapter 7: instruction tuning (data, finetune, responses, judge; prompt formats are jaxgpt.data.prompts)."""
