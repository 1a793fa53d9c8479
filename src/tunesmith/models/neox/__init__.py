"""GPT-NeoX / Pythia family."""
