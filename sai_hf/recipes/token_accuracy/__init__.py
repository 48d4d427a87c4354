"""A local ``evaluate`` metric module (``token_accuracy.py``), loaded with ``evaluate.load(<this directory>)``.

It lives in the package so that metrics work offline: ``evaluate.load("accuracy")`` would fetch a
script from the Hugging Face hub.
"""
