"""Number formats below the compute dtype and their scale rules (FP8 KV today; weight formats later).

    fp8.py   FP8 types (e4m3, e5m2), scale granularity and type (fp32, UE8M0), quantize / dequantize
"""
from tierlm.quant.fp8 import FP8_TYPES, SCALE_TYPES, Fp8Scheme, dequantize, quantize

__all__ = ["FP8_TYPES", "SCALE_TYPES", "Fp8Scheme", "dequantize", "quantize"]
