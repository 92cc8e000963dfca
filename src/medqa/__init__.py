"""medqa: fine-tune BioGPT (or any causal LM) with LoRA to answer patients' medical questions."""

__version__ = "0.1.0"
