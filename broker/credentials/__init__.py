"""The credential chain: where a request's STS credentials come from."""
