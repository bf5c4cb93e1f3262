"""What more than one method runs: CAT-Seg's cost-aggregation blocks (ESC-Net, SAM-MI) and mask
helpers (grouping linked masks, pooling features inside masks, the official 512² mask frame).

A method package imports from here, never from another method's package."""
