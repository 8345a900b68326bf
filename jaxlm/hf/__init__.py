"""Hugging Face interop: GPT-2, Llama and Mixtral checkpoints to and from jaxlm (local files)."""
