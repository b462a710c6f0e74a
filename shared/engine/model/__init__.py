"""The Llama-family decoder in flax NNX (llama.py) and its building blocks (layers.py,
rope.py). Imports only `shared.config` and `shared.engine.quantization`."""
