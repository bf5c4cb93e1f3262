"""ESC-Net: one-stage open-vocabulary segmentation; pseudo prompts from image–text correlation
drive SAM decoder blocks."""
