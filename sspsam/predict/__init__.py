"""Inference: the public ``Segmenter`` (referring) and ``OVSS`` (class names) on one
``Predictor`` base (device, dtype, image cache, model-name resolution), plus precision, ONNX,
batch jobs and the demo-domain check."""
