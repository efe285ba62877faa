"""LoRA network modules (kohya ``networks.*`` protocol)."""
