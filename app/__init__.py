"""HSCR Studio's Gradio UI: layout, event handlers and plots. All model math lives in ``hscr``."""
