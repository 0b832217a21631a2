"""Tiny datasets of rendered shapes, written to disk in real formats for the sample tests.

They exist so the samples' readers, training loops and exporters run end to end without a
download; accuracies measured on them mean nothing and are never reported as results.
"""
