"""Open-vocabulary semantic segmentation: CLIP cost maps, ESC-Net, SAM-MI and the OVSS predictor."""
