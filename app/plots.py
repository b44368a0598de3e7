"""Figures and HTML fragments: coloured tokens, heatmap overlays, word diffs and plotly charts."""

from __future__ import annotations

import difflib
import html
import math
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

POSITIVE_RGB = (215, 48, 31)    # the image raises the token (red)
NEGATIVE_RGB = (43, 140, 190)   # the image lowers the token (blue)


def score_limit(scores: Iterable[float]) -> float:
    """Return the colour-scale end in nats: the largest |score| rounded up to 0.5, at least 1."""
    largest = max((abs(s) for s in scores), default=0.0)
    return max(1.0, math.ceil(largest * 2) / 2)


def score_colour(score: float, limit: float) -> str:
    rgb = POSITIVE_RGB if score >= 0 else NEGATIVE_RGB
    alpha = min(abs(score) / limit, 1.0) * 0.85
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.3f})"


def display_text(token: dict[str, Any]) -> str:
    """Return how a token reads in the answer: its decoded text, else the raw token."""
    text = token.get("text")
    if text is None:
        text = str(token.get("token", "")).replace("\u2581", " ")
    return text


def token_tooltip(token: dict[str, Any]) -> str:
    score = float(token["score"])
    lines = [
        f"token {token['position']}: {token.get('token', '')!s}",
        f"coupling s = {score:+.3f} nats (the image multiplies p by {math.exp(score):.2f})",
        f"p with image = {float(token['p_full']):.4f}",
        f"p with {{dropped}} image tokens removed = {float(token['p_drop']):.4f}",
    ]
    if token.get("coupled") and token.get("replacement"):
        lines.append(f"replacement: {token['replacement']}")
    return "\n".join(lines)


def tokens_html(tokens: Sequence[dict[str, Any]], dropout_ratio: float | None = None) -> str:
    """Render answer tokens coloured by coupling score, with a legend in nats.

    Each token is a span whose ``title`` shows the score and both probabilities. Tokens flagged
    ``coupled`` (the tokens of the top-n coupled words) are underlined and numbered by score.
    """
    if not tokens:
        return "<div class='hscr-tokens'><em>No tokens to show.</em></div>"
    limit = score_limit(float(t["score"]) for t in tokens)
    coupled = sorted((t for t in tokens if t.get("coupled")), key=lambda t: -float(t["score"]))
    rank_of = {int(t["position"]): rank for rank, t in enumerate(coupled, start=1)}
    dropped = f"{dropout_ratio:.0%} of" if dropout_ratio is not None else "the dropped"

    spans = []
    for token in tokens:
        position = int(token["position"])
        score = float(token["score"])
        classes = "hscr-token hscr-coupled" if position in rank_of else "hscr-token"
        badge = f"<sup>{rank_of[position]}</sup>" if position in rank_of else ""
        tooltip = token_tooltip(token).replace("{dropped}", dropped)
        spans.append(
            f"<span class='{classes}' data-position='{position}' data-score='{score:.6f}' "
            f"data-p-full='{float(token['p_full']):.6f}' data-p-drop='{float(token['p_drop']):.6f}' "
            f"title='{html.escape(tooltip, quote=True)}' style='background:{score_colour(score, limit)}'>"
            f"{html.escape(display_text(token)) or '&nbsp;'}{badge}</span>"
        )
    return (
        "<div class='hscr-tokens'>" + "".join(spans) + "</div>" + score_legend(limit) +
        f"<div class='hscr-note'>Underlined: the {len(rank_of)} tokens of the top-n coupled words; the small "
        "number ranks each by its score. Hover a token for its score and probabilities.</div>"
    )


def score_legend(limit: float) -> str:
    """Render a colour bar from -limit to +limit nats with the matching probability ratios."""
    neg = f"rgba({NEGATIVE_RGB[0]}, {NEGATIVE_RGB[1]}, {NEGATIVE_RGB[2]}, 0.85)"
    pos = f"rgba({POSITIVE_RGB[0]}, {POSITIVE_RGB[1]}, {POSITIVE_RGB[2]}, 0.85)"
    ticks = [-limit, -limit / 2, 0.0, limit / 2, limit]
    labels = "".join(
        f"<span>{tick:+.2g} nats<br>×{math.exp(tick):.2g}</span>" for tick in ticks
    )
    return (
        "<div class='hscr-legend' data-limit='%.3f'>"
        "<div class='hscr-legend-title'>coupling s = log p(token | image) − log p(token | dropped image)</div>"
        f"<div class='hscr-legend-bar' style='background:linear-gradient(to right, {neg}, white, {pos})'></div>"
        f"<div class='hscr-legend-ticks'>{labels}</div></div>" % limit
    )


def heatmap_overlay(image: Image.Image, grid: np.ndarray, opacity: float = 0.55) -> Image.Image:
    """Blend a patch-importance grid over the image: red where occluding a patch lowers the token.

    The grid is scaled to the image with bilinear interpolation, its colour runs from blue
    (negative) through transparent to red (positive), relative to its largest absolute value.
    """
    base = image.convert("RGB")
    values = np.asarray(grid, dtype=np.float32)
    largest = float(np.abs(values).max()) or 1.0
    normalized = Image.fromarray(values / largest, mode="F").resize(base.size, Image.Resampling.BILINEAR)
    scaled = np.clip(np.asarray(normalized), -1.0, 1.0)                        # (H, W) in [-1, 1]

    colour = np.where(scaled[..., None] >= 0, np.array(POSITIVE_RGB), np.array(NEGATIVE_RGB))  # (H, W, 3)
    alpha = (np.abs(scaled) * opacity)[..., None]                              # (H, W, 1)
    pixels = np.asarray(base, dtype=np.float32)
    blended = pixels * (1 - alpha) + colour * alpha
    return Image.fromarray(blended.round().clip(0, 255).astype("uint8"), mode="RGB")


def zoom_image(image: Image.Image, zoom: float, center_x: float = 0.5, center_y: float = 0.5) -> Image.Image:
    """Crop around a centre (fractions of width and height) and scale the crop back up.

    Nearest-neighbour scaling keeps the pixels of small medical images sharp.
    """
    if zoom <= 1.0:
        return image
    width, height = image.size
    crop_w, crop_h = max(1, round(width / zoom)), max(1, round(height / zoom))
    left = min(max(round(center_x * width - crop_w / 2), 0), width - crop_w)
    top = min(max(round(center_y * height - crop_h / 2), 0), height - crop_h)
    crop = image.crop((left, top, left + crop_w, top + crop_h))
    return crop.resize((width, height), Image.Resampling.NEAREST)


def display_size(image: Image.Image, minimum: int = 384) -> Image.Image:
    """Scale small images up by a whole factor (nearest neighbour) so their pixels stay visible."""
    side = max(image.size)
    if side >= minimum:
        return image
    factor = -(-minimum // side)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def word_diff_html(reference: str, text: str) -> str:
    """Render ``text`` with the words that differ from ``reference`` highlighted."""
    ref_words, words = reference.split(), text.split()
    matcher = difflib.SequenceMatcher(a=ref_words, b=words, autojunk=False)
    parts = []
    for op, _, _, start, end in matcher.get_opcodes():
        chunk = html.escape(" ".join(words[start:end]))
        if not chunk:
            continue
        if op == "equal":
            parts.append(chunk)
        else:
            parts.append(f"<mark class='hscr-diff'>{chunk}</mark>")
    return " ".join(parts)


def _figure(rows: int = 1, cols: int = 1, titles: Sequence[str] = ()):
    from plotly.subplots import make_subplots

    return make_subplots(rows=rows, cols=cols, subplot_titles=list(titles))


TRAIN_PANELS = (
    ("loss", ("loss", "loss/explicit", "loss/implicit")),
    ("reward margins", ("rewards/margins", "rewards/chosen", "rewards/rejected")),
    ("accuracies", ("rewards/accuracies", "rewards/implicit_accuracies")),
)


def training_figure(metrics: Sequence[dict[str, Any]]):
    """Plot training curves: loss terms, reward margins and preference accuracies by step."""
    import plotly.graph_objects as go

    figure = _figure(1, len(TRAIN_PANELS), [title for title, _ in TRAIN_PANELS])
    for col, (_, names) in enumerate(TRAIN_PANELS, start=1):
        for name in names:
            points = [(m.get("step"), m[name]) for m in metrics if m.get(name) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            figure.add_trace(go.Scatter(x=list(steps), y=list(values), mode="lines+markers", name=name), row=1, col=col)
    figure.update_xaxes(title_text="step")
    figure.update_layout(height=320, margin=dict(l=40, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25))
    return figure


def metrics_bar_figure(rows: Sequence[dict[str, Any]], metric: str):
    """Grouped bars of one metric per dataset, one bar per model (base, trained)."""
    import plotly.graph_objects as go

    figure = _figure(1, 1, [metric])
    models = sorted({r["model"] for r in rows})
    for model in models:
        points = [(r["dataset"], r.get(metric)) for r in rows if r["model"] == model and r.get(metric) is not None]
        if points:
            datasets, values = zip(*points)
            figure.add_trace(go.Bar(x=list(datasets), y=list(values), name=model))
    figure.update_yaxes(rangemode="tozero")
    figure.update_layout(barmode="group", height=320, margin=dict(l=40, r=10, t=40, b=40),
                         legend=dict(orientation="h", y=-0.2))
    return figure
