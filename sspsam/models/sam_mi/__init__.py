"""SAM-MI: Text-guided Sparse Point Prompter, Shallow Mask Aggregation and Decoupled Mask Injection
into CLIP cost maps."""
