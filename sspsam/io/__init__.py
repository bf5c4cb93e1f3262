"""Files in and out: images (any form users have), masks (RLE, overlays, palette PNGs), SAM's
letterbox, checkpoint reading/atomic writing, and weight downloads. Depends on nothing else of ours
but ``sspsam.errors``."""
