"""Model families, one module each: config parsing, parameter declarations, decoder block
(see models.family; models.registry maps architectures to them)."""
