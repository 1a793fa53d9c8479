"""GPT-J (EleutherAI GPT-J-6B): config, model, HF state-dict adapter and tensor-parallel plan."""
