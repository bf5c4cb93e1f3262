"""Training and evaluation for every method: one loop (:mod:`~sspsam.engine.loop`) running a task
per method family (:mod:`~sspsam.engine.tasks`), losses, the reference metrics, evaluation and the
feature cache. No command lines here: those are ``sspsam/cli`` and ``scripts/``."""
