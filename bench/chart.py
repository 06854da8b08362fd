#!/usr/bin/env python3
"""Chart and table of a bench/run.sh run, from its machine-readable rows (stdlib only).

    python3 bench/chart.py RES_DIR OUT_DIR [README]

RES_DIR is the run's `res/` directory:
  rows.tsv    one line per measured row, in the order they ran (written by `measure`):
              key, wall seconds (median), peak RSS MiB (median), runs
  labels.tsv  key, label: what the tables call each row (a key without one is shown as is)
  KEY.rt      optional: "requests round_trips" of that row's last run (the delay-proxy rows)

Writes OUT_DIR/latest.svg (wall time per row; requests and round trips where recorded),
OUT_DIR/latest.tsv (the rows with their labels) and OUT_DIR/latest.md (the machine line,
the chart and the table). With README, the part between the markers
`<!-- bench:latest -->` and `<!-- /bench:latest -->` is replaced by latest.md.
Generic over the rows: whatever a section measures is charted, in the order it ran.
"""

import datetime
import os
import sys
from xml.sax.saxutils import escape

BEGIN, END = "<!-- bench:latest -->", "<!-- /bench:latest -->"

# Bar colour by the first word of a row's label (the tool measured); others are grey.
COLOURS = {
    "imgbuild": "#1f6fb4",
    "buildah": "#c0392b",
    "docker": "#27ae60",
    "skopeo": "#8e44ad",
    "pigz": "#7f8c8d",
    "zstd": "#95a5a6",
}
OTHER = "#b0b0b0"


def read_rows(res):
    labels = {}
    path = os.path.join(res, "labels.tsv")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0]:
                labels[parts[0]] = parts[1]
    rows, seen = [], {}
    path = os.path.join(res, "rows.tsv")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            key, wall, rss, runs = parts[:4]
            row = {
                "key": key,
                "label": labels.get(key, key),
                "wall": float(wall),
                "rss": float(rss),
                "runs": int(runs),
                "requests": None,
                "trips": None,
            }
            rt = os.path.join(res, f"{key}.rt")
            if os.path.exists(rt):
                try:
                    reqs, trips = open(rt).read().split()[:2]
                    row["requests"], row["trips"] = int(reqs), int(trips)
                except ValueError:
                    pass
            # A key measured twice keeps its last figures, in its first place.
            if key in seen:
                rows[seen[key]] = row
            else:
                seen[key] = len(rows)
                rows.append(row)
    return rows


def machine():
    cores = os.cpu_count() or 0
    mem_gib = 0.0
    model = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1 << 20)
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = " ".join(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    text = f"{cores} cores, {mem_gib:.0f} GiB RAM"
    return f"{text} ({model})" if model else text


def inputs():
    env = os.environ
    size = env.get("BENCH_SIZE_MIB", "100")
    big = env.get("BENCH_BIG_MIB", "1024")
    runs = env.get("BENCH_RUNS", "3")
    median = "1 run per row" if runs == "1" else f"median of {runs} runs"
    text = f"2 platforms x {size} MiB artifact, big row {big} MiB, {median}"
    if "BENCH_DELAY_MS" in env:
        text += f", {env['BENCH_DELAY_MS']} ms per request in the round-trip rows"
    return text


def once(r):
    """The row's label, saying when it is a single run in a run of medians (unless the label
    already does)."""
    if r["runs"] == 1 and os.environ.get("BENCH_RUNS", "3") != "1" and "1 run" not in r["label"]:
        return f'{r["label"]} (1 run)'
    return r["label"]


def colour(label):
    return COLOURS.get(label.split(" ", 1)[0].lower(), OTHER)


def scale_max(values):
    """The axis end: the largest value, unless one row dwarfs the rest (the big artifact):
    then 3x the third-largest, and longer bars are cut and marked."""
    vals = sorted(v for v in values if v > 0)
    if not vals:
        return 1.0
    top = vals[-1]
    if len(vals) >= 4 and top > 3 * vals[-3]:
        return 3 * vals[-3]
    return top


def nice_ticks(vmax):
    step = 10 ** len(str(int(vmax))) / 10 if vmax >= 1 else 0.1
    for mult in (1, 2, 5, 10):
        if vmax / (step * mult) <= 6:
            step *= mult
            break
    ticks, t = [], 0.0
    while t <= vmax * 1.0001:
        ticks.append(round(t, 6))
        t += step
    return ticks


def panel(out, y, title, rows, value, text, width, label_w, inner=None):
    """A horizontal bar panel (with `inner`, a darker bar inside each); returns the next free y."""
    bar_x, bar_w, row_h = label_w + 10, width - label_w - 200, 20
    out.append(f'<text x="10" y="{y}" class="h">{escape(title)}</text>')
    y += 12
    vals = [value(r) for r in rows]
    vmax = scale_max(vals)
    top = y
    for i, r in enumerate(rows):
        v = value(r)
        cy = y + i * row_h
        out.append(
            f'<text x="{label_w}" y="{cy + 14}" text-anchor="end">{escape(once(r))}</text>'
        )
        w = bar_w * min(v, vmax) / vmax if vmax else 0
        out.append(
            f'<rect x="{bar_x}" y="{cy + 3}" width="{w:.1f}" height="{row_h - 6}" '
            f'fill="{colour(r["label"])}"/>'
        )
        if inner is not None:
            iw = bar_w * min(inner(r), vmax) / vmax if vmax else 0
            out.append(
                f'<rect x="{bar_x}" y="{cy + 3}" width="{iw:.1f}" height="{row_h - 6}" '
                f'fill="#000" fill-opacity=".35"/>'
            )
        if v > vmax:
            bx = bar_x + bar_w - 8
            out.append(
                f'<path d="M{bx} {cy + 2} l6 {row_h - 4} M{bx + 5} {cy + 2} l6 {row_h - 4}" '
                f'stroke="#fff" stroke-width="2"/>'
            )
        out.append(f'<text x="{bar_x + w + 5:.1f}" y="{cy + 14}">{escape(text(r))}</text>')
    bottom = y + len(rows) * row_h
    for t in nice_ticks(vmax):
        tx = bar_x + bar_w * t / vmax
        out.append(
            f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{bottom}" class="grid"/>'
        )
        out.append(
            f'<text x="{tx:.1f}" y="{bottom + 13}" text-anchor="middle" class="s">{t:g}</text>'
        )
    return bottom + 36


def svg(rows, when, mach, inp):
    width, label_w = 980, 400
    out = []
    y = 24
    out.append(f'<text x="10" y="{y}" class="t">imgbuild benchmark (bench/run.sh), {when}</text>')
    y += 18
    out.append(f'<text x="10" y="{y}" class="s">{escape(mach)}; {escape(inp)}</text>')
    y += 30
    if rows:
        y = panel(
            out,
            y,
            "Wall time, seconds (shorter is better); label: seconds, peak RSS",
            rows,
            lambda r: r["wall"],
            lambda r: f'{r["wall"]:.2f} s, {r["rss"]:.0f} MiB',
            width,
            label_w,
        )
    rt = [r for r in rows if r["requests"] is not None]
    if rt:
        y = panel(
            out,
            y,
            "Requests per push; dark: round trips on the critical path",
            rt,
            lambda r: r["requests"],
            lambda r: f'{r["requests"]} requests, {r["trips"]} round trips',
            width,
            label_w,
            inner=lambda r: r["trips"],
        )
    if not rows:
        out.append(f'<text x="10" y="{y}">no rows recorded</text>')
        y += 20
    height = y
    style = (
        "text{font-family:DejaVu Sans,Arial,sans-serif;font-size:12px;fill:#222}"
        ".t{font-size:16px;font-weight:bold}.h{font-size:13px;font-weight:bold}"
        ".s{font-size:11px;fill:#555}.grid{stroke:#000;stroke-opacity:.12}"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">\n<style>{style}</style>\n'
        f'<rect width="{width}" height="{height}" fill="#fff"/>\n' + "\n".join(out) + "\n</svg>\n"
    )


def table(rows):
    rt = any(r["requests"] is not None for r in rows)
    head = "| row | wall s | peak RSS MiB |" + (" requests | round trips |" if rt else "")
    lines = [head, "|---|---:|---:|" + ("---:|---:|" if rt else "")]
    for r in rows:
        line = f'| {once(r)} | {r["wall"]:.2f} | {r["rss"]:.0f} |'
        if rt:
            line += "".join(f' {"" if v is None else v} |' for v in (r["requests"], r["trips"]))
        lines.append(line)
    return "\n".join(lines)


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    res, out_dir = argv[1], argv[2]
    readme = argv[3] if len(argv) > 3 else None
    rows = read_rows(res)
    # The run's date: when its last row was recorded (redrawing later does not change it).
    rows_tsv = os.path.join(res, "rows.tsv")
    stamp = os.path.getmtime(rows_tsv) if os.path.exists(rows_tsv) else None
    when = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc) if stamp else None
    when = when.strftime("%Y-%m-%d %H:%M UTC") if when else "no run"
    mach, inp = machine(), inputs()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latest.svg"), "w", encoding="utf-8") as f:
        f.write(svg(rows, when, mach, inp))
    with open(os.path.join(out_dir, "latest.tsv"), "w", encoding="utf-8") as f:
        f.write("key\tlabel\twall_s\tpeak_rss_mib\truns\trequests\tround_trips\n")
        for r in rows:
            f.write(
                "\t".join(
                    str(x if x is not None else "")
                    for x in (r["key"], r["label"], f'{r["wall"]:.2f}', f'{r["rss"]:.0f}',
                              r["runs"], r["requests"], r["trips"])
                )
                + "\n"
            )
    md = (
        f"Latest run: {when}, on {mach}; {inp} (`bench/results/latest.tsv`).\n\n"
        "![imgbuild benchmark: wall time per row](bench/results/latest.svg)\n\n"
        + table(rows)
        + "\n"
    )
    with open(os.path.join(out_dir, "latest.md"), "w", encoding="utf-8") as f:
        f.write(md)
    if readme:
        text = open(readme, encoding="utf-8").read()
        start, end = text.find(BEGIN), text.find(END)
        if start < 0 or end < start:
            sys.exit(f"{readme}: no {BEGIN} ... {END} block to replace")
        text = text[: start + len(BEGIN)] + "\n" + md + text[end:]
        with open(readme, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"chart: {os.path.join(out_dir, 'latest.svg')} ({len(rows)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
