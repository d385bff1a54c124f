"""Command-line tools that are not part of training or evaluation."""
