"""Where params come from: `load_model` (checkpoint.py) turns a preset name, a packaged
model (packaged.py), a GGUF file, an orbax checkpoint or a Hugging Face directory into
params for an `Engine`; hf.py reads safetensors; gguf_import.py and gguf_tokenizer.py read
GGUF files (tensors; tokenizer and chat template); tree.py maps external tensor names onto
the NNX param tree; convert_cli.py is `pdserve convert`; model_info.py loads only a
model's config, tokenizer and chat template (the orchestrator never loads weights).

Imports `shared.config`, `shared.engine` and `shared.tokenizer`; never a server, never the
transport.
"""
