"""Base model + tokenizer, precision, and adapters."""
