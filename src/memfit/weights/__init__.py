"""Weight quantization: group-wise RTN and HQQ, loss-guided codebooks, any-precision; packed QuantLinear layers."""

from memfit.weights.io import is_quantized_folder, load_quantized, save_quantized
from memfit.weights.linear import QuantLinear
from memfit.weights.quantize import METHODS, QuantReport, WeightQuant, quantize_, set_read_bits, weight_bytes

__all__ = ["METHODS", "QuantLinear", "QuantReport", "WeightQuant", "is_quantized_folder", "load_quantized",
           "quantize_", "save_quantized", "set_read_bits", "weight_bytes"]
