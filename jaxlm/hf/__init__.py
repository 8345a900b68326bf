"""Hugging Face interop: GPT-2 and Llama checkpoints to and from jaxlm (local files only)."""
