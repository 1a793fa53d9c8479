"""gpt2 family."""
