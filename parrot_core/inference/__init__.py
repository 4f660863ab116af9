"""Inference on top of the backend contract: generation and its text stream, batched answering, chat
sessions, answering files of requests, benchmarks."""
