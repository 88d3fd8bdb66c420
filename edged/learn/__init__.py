"""On-device continual learning: trainable heads, strategies against forgetting, ONNX graphs."""
