"""Export: merged full-precision models (quantized formats slot in beside it)."""
