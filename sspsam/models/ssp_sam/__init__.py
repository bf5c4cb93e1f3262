"""SSP-SAM (Tang et al., TCSVT 2025): CLIP-Surgery features → Semantic-Spatial Prompt encoder
(Visual / Linguistic Attention Adapters, fusion, Prompt Generator) → SAM's mask decoder."""
