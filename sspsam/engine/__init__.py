"""Training and evaluation for every method: the trainer (DDP, bit-exact resume, AMP, TensorBoard,
atomic checkpoints), losses, the reference metrics, evaluation and the feature cache."""
