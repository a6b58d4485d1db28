"""Model: which networks exist, building them, and running them (OpenVINO, ONNX Runtime, PyTorch)."""
