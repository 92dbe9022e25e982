"""The arcface_torch-compatible code around the plugin: config, data, training, evaluation."""
