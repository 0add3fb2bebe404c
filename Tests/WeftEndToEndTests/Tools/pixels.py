#!/usr/bin/env python3
"""Counts the pixels of a PNG that are within a small distance of each given
colour: pixels.py FILE '#rrggbb' ... -> {"#rrggbb": count, ..., "size": [w, h]}.
Used to check what headless Chromium drew."""
import json
import sys

from PIL import Image

image = Image.open(sys.argv[1]).convert("RGB")
wanted = {c: tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in sys.argv[2:]}
counts = {c: 0 for c in wanted}
for pixel in image.getdata():
    for name, rgb in wanted.items():
        if sum(abs(a - b) for a, b in zip(pixel, rgb)) <= 24:
            counts[name] += 1
counts["size"] = list(image.size)
print(json.dumps(counts))
