"""GPT-NeoX / Pythia model patches: W8A16 linears, checkpoints, KV-cache policies."""
from .checkpoint import load_quantized, save_quantized
from .quant import W8A16Linear, W8A16MLP, is_quantized, quantize_model
from .sources import load_model
from .attention import patch_attention
from .decoder import Decoder
from .hf_cache import PolicyCache
