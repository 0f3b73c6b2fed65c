"""Preprocessing: pure functions from request media and messages to model inputs (no Triton / HTTP).

- `errors`: `PreprocessError(code, message, param)` — every user-caused failure (HTTP 400).
- `image`: decode, tile and normalize images (docs/model.md §2), bit-exact to the Pillow reference.
- `video`: frame sampling and selective decoding (docs/model.md §3.1–3.2).
- `evs`: Efficient Video Sampling token pruning (docs/model.md §3.4).
- `prompt`: chat template rendering and image / video token expansion (docs/model.md §3.3, §5).
"""
