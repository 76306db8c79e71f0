"""Shipping a model: ONNX export with its parity check, int8 quantization and the graph rewrites behind it,
and the HTTP server. Public entry point: :func:`imgclf.export`; ``imgclf serve`` on the command line."""
