"""Developer tools: golden-fixture regeneration and the fidelity report."""
