"""Pure PyTorch model library: ResTok tokenizer, HAR / vanilla AR generator, losses.

Never imports Ray, DeepSpeed or MLflow (checked by tests/test_layering.py).
"""
