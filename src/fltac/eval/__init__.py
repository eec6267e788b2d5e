"""Evaluation: per-task accuracy of an adapter on a fixed seeded test sample."""
