"""Online speculative distillation (OSD): a draft distilled from its target while it serves."""
