"""The MoE language model: tokenizer, layers, training, generation, checkpoints."""
