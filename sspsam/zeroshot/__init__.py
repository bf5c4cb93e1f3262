"""Training-free path: pretrained CLIP + SAM only (OVSS and RES)."""
