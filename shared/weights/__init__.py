"""Where params come from: `load_model` (checkpoint.py) turns a preset name, an orbax
checkpoint or a Hugging Face directory into params for an `Engine`; hf.py reads
safetensors; tree.py maps external tensor names onto the NNX param tree; convert_cli.py is
`pdserve convert`; model_info.py loads only a model's config and tokenizer (the
orchestrator never loads weights).

Imports `shared.config`, `shared.engine` and `shared.tokenizer`; never a server, never the
transport.
"""
