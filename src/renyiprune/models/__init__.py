"""renyiprune's ViT and its registry (model), weight files (weights), HF conversion (hf), ONNX export."""
