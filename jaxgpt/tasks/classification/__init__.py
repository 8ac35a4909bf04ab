"""Chapter 6: finetuning a GPT as a text classifier (data, model, finetune)."""
