"""Code of the Triton Python models (the generated `model.py` files import `TritonPythonModel` from here)."""
