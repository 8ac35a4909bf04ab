"""Preference tuning (the book's chapter 7 bonus): pairs, the DPO/IPO objectives, stored references, finetune."""
