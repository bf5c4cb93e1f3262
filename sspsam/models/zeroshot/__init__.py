"""Training-free path: pretrained CLIP (SCLIP / CLIP-Surgery dense features) + SAM only."""
