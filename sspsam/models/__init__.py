"""The methods, one package each, built on ``sspsam.backbones``: ``ssp_sam`` (referring, RES/GRES),
``escnet`` and ``sam_mi`` (open-vocabulary semantic segmentation), ``zeroshot`` (training-free
SCLIP / CLIP-Surgery + SAM). ``cost`` holds the CLIP image-text cost maps the OVSS methods share."""
