"""Multi-teacher KV-cache distillation: extraction, alignment, fusion, masked losses."""
