"""Deployment: export to ONNX and ``torch.export`` (``export``) and int8 quantization (``quantize``)."""
