"""sattrain: Saliency-based Adversarial Training (SAT) and robustness evaluation from a store."""

__version__ = "0.1.0"
