"""HSCR Studio: Hierarchical Self-Contrastive Rewarding for medical vision-language models.

The library turns (image, question, reference answer) samples into ranked preference data and
trains a model on it with Multi-Level Preference Optimization (MLPO). It never imports the UI.

    python -m hscr --help
"""

__version__ = "0.1.0"
