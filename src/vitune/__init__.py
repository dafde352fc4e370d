"""vitune: fine-tune open LLMs on Alpaca and ShareGPT data, first-class for Vietnamese."""

__version__ = "0.1.0"
