"""Models: the pretrained backbone (loaded once, frozen) and the LoRA adapters swapped on it."""
