"""Constrained decoding: grammars compiled from request fields, matched on the host, applied
as packed bitmasks by the device sampler."""
