"""bert family."""
