"""SigLIP image encoder for multimodal Gemma 3 (see the vision issue; not yet implemented)."""
