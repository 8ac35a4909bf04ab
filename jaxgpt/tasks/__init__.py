"""The book's recipes as library calls: pretraining, classification, instruction tuning."""
