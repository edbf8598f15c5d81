"""The tab's loss plot: training loss per step, the validation loss beside it, the best step and the alarm.

Drawn with Pillow on a transparent background, so it reads on the WebUI's light and dark themes alike and
needs no plotting library or JavaScript.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

PLOT_SIZE = (640, 240)
GREY = (128, 128, 128, 255)
TRAIN = (59, 130, 246, 255)  # blue: training loss (moving average)
VALIDATION = (234, 88, 12, 255)  # orange: validation loss
BEST = (22, 163, 74, 255)  # green: the best validation step
ALARM = (220, 38, 38, 255)  # red: where the overfitting alarm fired


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def render_loss_plot(losses: Sequence[float], size: tuple[int, int] = PLOT_SIZE, first_step: int = 1, *,
                     validation: Sequence[Sequence[float]] = (), best_step: int | None = None,
                     alarm_step: int | None = None) -> Image.Image:
    """Loss per step (faint), its moving average (blue), and, when given, the validation loss at its steps
    (orange, ``(step, loss)`` pairs), the best step (green) and the alarm's step (red). ``first_step`` is the
    step of the first loss (a resumed run's curve starts after its checkpoint; its earlier evaluations show)."""
    width, height = size
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 12, 30, height - 24  # top margin: gradio's label badge sits there
    draw.rectangle([left, top, right, bottom], outline=GREY)
    values = [float(v) for v in losses if v == v]  # drop NaN
    checks = [(int(p[0]), float(p[1])) for p in validation if p[1] == p[1]]
    if not values:
        draw.text((left + 10, top + 10), "no loss yet", fill=GREY)
        return image
    shown = values + [loss for _, loss in checks]
    low, high = min(shown), max(shown)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    marked = [step for step, _ in checks] + [s for s in (best_step, alarm_step) if s]
    first = min([first_step, *marked])
    last_step = max([first_step + len(values) - 1, *marked])
    span_x = max(last_step - first, 1)

    def point(step: int, v: float) -> tuple[float, float]:
        return (left + (right - left) * (step - first) / span_x, bottom - (bottom - top) * (v - low) / (high - low))

    def line(series: list[tuple[int, float]], colour: tuple, line_width: int) -> None:
        if len(series) == 1:
            x, y = point(*series[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            draw.line([point(s, v) for s, v in series], fill=colour, width=line_width)

    for step, colour in ((best_step, BEST), (alarm_step, ALARM)):
        if step:
            x = point(step, low)[0]
            for y in range(top, bottom, 8):  # dashed
                draw.line([(x, y), (x, min(y + 4, bottom))], fill=colour, width=2)
    window = max(1, len(values) // 20)
    if window > 1:
        line(list(enumerate(values, start=first_step)), (150, 150, 150, 150), 1)
    line(list(enumerate(moving_average(values, window), start=first_step)), TRAIN, 2)
    if checks:
        line(checks, VALIDATION, 2)
        for step, loss in checks:
            x, y = point(step, loss)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=VALIDATION)
        legend = [("training", TRAIN), ("validation", VALIDATION)]  # above the box, right of gradio's badge
        legend += [(f"best: step {best_step}", BEST)] if best_step else []
        legend += [(f"overfitting from step {alarm_step}", ALARM)] if alarm_step else []
        x = left + 46
        for words, colour in legend:
            draw.text((x, top - 18), words, fill=colour)
            x += draw.textlength(words) + 14
    draw.text((4, top - 4), f"{high:.4f}", fill=GREY)
    draw.text((4, bottom - 8), f"{low:.4f}", fill=GREY)
    draw.text((4, (top + bottom) // 2 - 4), "loss", fill=GREY)
    draw.text((left, bottom + 6), f"step {first}", fill=GREY)
    draw.text((right - 60, bottom + 6), f"step {last_step}", fill=GREY)
    return image
