"""Model bundles: a trained run root as one verified folder, its model card, and its ONNX export."""
