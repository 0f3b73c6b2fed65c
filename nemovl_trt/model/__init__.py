"""PyTorch reference of Nemotron Nano 12B v2 VL (docs/model.md §4, §6).

radio.py (RADIO ViT) · projector.py (pixel shuffle, mlp1) · vision.py (VisionEncoder) ·
mamba2.py (Mamba2 mixer, SSD scan) · nemotron_h.py (NemotronHLM) · vlm.py (NemotronVLM) ·
sampling.py + engine.py (continuous batching) · commands.py (`nemovl generate`) · bench.py.
Submodules are imported on demand so `import nemovl_trt.model` stays cheap.
"""
